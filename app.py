"""The Space's entry point: `python app.py` serves DPO Space on port 7860 (the embedded model where there is no GPU)."""

import os

from dpo_space.ui import build_app, launch

demo = build_app()

if __name__ == "__main__":
    launch(demo, server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
           server_port=int(os.environ.get("PORT", "7860")))
