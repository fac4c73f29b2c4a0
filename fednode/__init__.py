"""fednode: peer-to-peer federated fine-tuning of LoRA adapters."""
