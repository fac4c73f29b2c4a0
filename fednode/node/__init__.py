"""The node daemon: services, round driver, control endpoint, metrics, records."""
