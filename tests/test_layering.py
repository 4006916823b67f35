"""The math modules import torch (and safetensors) only: checked in a fresh interpreter."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["lora_ogpsa.subspace", "lora_ogpsa.projector", "lora_ogpsa.config"])
def test_math_modules_do_not_import_the_hf_stack(module):
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in ('transformers', 'trl', 'peft', 'bitsandbytes', 'accelerate', 'datasets')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"{module} pulled in {result.stdout.strip()}"
