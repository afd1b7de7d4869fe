"""GPU checks (marker ``gpu``): the transformers engine on CUDA with a production architecture.

No weights reach a GPU machine without network, so the model is Qwen2.5-0.5B-Instruct's real config with random
weights (``engine.load_format: dummy``), as vLLM's dummy load format does; outputs are meaningless, but shapes,
dtypes, batching, fixed-length decoding and memory are real. Skipped where CUDA is not available.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_transformers_engine_on_cuda_with_production_architecture():
    from benchmarks.bench_engines import dummy_model_dir
    from stepback_ray.config import EngineConfig
    from stepback_ray.engines import SamplingParams, build_engine

    model_dir = dummy_model_dir("qwen2.5-0.5b")
    engine = build_engine(EngineConfig(model=model_dir, device="cuda", load_format="dummy", batch_size=8))
    try:
        prompts = [f"Write a title for paper number {i} about graph neural networks." for i in range(12)]
        params = SamplingParams(max_new_tokens=16, min_new_tokens=16, stop=())
        torch.cuda.reset_peak_memory_stats()
        outs = engine.generate(prompts, params)
        assert len(outs) == len(prompts)
        assert all(o.error is None and o.completion_tokens == 16 and o.prompt_tokens > 5 for o in outs)
        assert all(o.finish_reason == "length" for o in outs)
        # bf16 weights of a ~0.5B model: about 1 GiB on the device, well under the whole card
        peak = torch.cuda.max_memory_allocated()
        assert 0.5 * 2**30 < peak < 0.5 * torch.cuda.get_device_properties(0).total_memory
    finally:
        engine.close()
