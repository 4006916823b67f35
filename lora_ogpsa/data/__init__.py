"""Reading and validating rows in TRL's data formats."""
