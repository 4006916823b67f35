"""The demo's evaluator is the library's cached evaluator (`eval.cached`); this name stays for scripts that
import it from here."""

from lora_ogpsa.eval.cached import LAMBDAS, Evaluator

__all__ = ["LAMBDAS", "Evaluator"]
