"""DPO Space: upload preference data, run 4-bit QLoRA DPO, and compare the base and DPO models side by side.

The engine (this package, no Gradio) is usable from Python and from `python -m dpo_space`; `app.py` is the Space.
"""

__version__ = "0.1.0"
