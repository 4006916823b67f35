"""Pure math: the subspace, its streaming sketch and the projection (torch and safetensors only)."""
