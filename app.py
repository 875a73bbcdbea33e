"""The Space's entry point: `python app.py` serves DPO Space on port 7860 (the embedded model where there is no GPU)."""

import os

from dpo_space.workbench import bound_malloc

bound_malloc()  # before the server's threads start: its native memory stays level over many visitors (BENCHMARKS.md)

from dpo_space.ui import build_app, launch  # noqa: E402

demo = build_app()

if __name__ == "__main__":
    launch(demo, server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
           server_port=int(os.environ.get("PORT", "7860")))
