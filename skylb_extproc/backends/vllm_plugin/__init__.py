"""Code loaded *inside* a vLLM server process (its own venv): this folder goes on its PYTHONPATH.

Only `skylb_vllm_pod.py` is meant to be imported from there; it uses the standard library alone.
"""
