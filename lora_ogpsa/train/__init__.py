"""Training runs: settings (declared once), TRL trainers, checkpoint files, sft / dpo / align."""
