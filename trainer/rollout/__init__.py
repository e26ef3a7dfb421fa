"""From prompts to a scored batch: what an engine returns and the interface the loop drives (`engine`), the engines
(`hf_engine`: transformers `generate`; `vllm_engine`: a colocated vLLM, imported only when selected), and one
step's batch: sampling -> scoring -> dynamic sampling (`batch`)."""
