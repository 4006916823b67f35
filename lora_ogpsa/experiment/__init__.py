"""Experiments on any model and suites: methods × seeds trained with run caching by content (`engine`, `cache`),
statistics across seeds and paired (`stats`), reports (`report`, `compare_report`), `compare` and `calibrate` on
the user's suite files (`suites`, `arguments`). It knows no demo suite: the demo (`lora_ogpsa.demo.run`) is one
experiment run through it."""
