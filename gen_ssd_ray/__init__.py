"""gen-ssd-ray: Generation-time Self-Selection Distillation as a resumable Ray batch job.

Importing the package is cheap: heavy dependencies (ray, torch, vllm, transformers) are imported
inside the modules that need them, never here.
"""

__version__ = "0.1.0"
