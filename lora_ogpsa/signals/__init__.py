"""What a refresh measures on the reference data: per-example gradients, refusal margins, input moments; ranks."""
