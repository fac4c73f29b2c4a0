"""Local multi-process federations: start daemons, watch them, report."""
