"""Runs llama-cpp-python's own OpenAI-compatible server (FastAPI) as a real upstream for the tests.

`python -m tests.llama_server --model GGUF --port P ...` takes the server's own arguments. It only
turns off llama.cpp's extra buffer types first, as Jarvis's embedded model does: their AMX path
crashes on this VM's CPU.
"""

import runpy

from jarvis.backends.local import extra_buffer_types_off

if __name__ == "__main__":
    with extra_buffer_types_off():
        runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
