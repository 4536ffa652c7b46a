"""train/models/toy.py's random-weight pipelines: what the SD-1.5-width tests and benchmarks build."""

from __future__ import annotations

import pytest
import torch

from sdkd.train.models.toy import TOY_UNET, build_random_pipeline


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_random_pipeline_is_built_in_the_dtype_asked(dtype):
    pipe = build_random_pipeline(TOY_UNET, widths="toy", dtype=dtype)
    modules = (pipe.unet, pipe.vae, pipe.text_encoder)
    assert {p.dtype for m in modules for p in m.parameters()} == {dtype}
    assert torch.get_default_dtype() == torch.float32  # nothing process-wide was changed to get there
    (position_ids,) = [b for n, b in pipe.text_encoder.named_buffers() if n.endswith("position_ids")]
    assert position_ids.dtype == torch.int64 and torch.equal(position_ids[0], torch.arange(position_ids.shape[-1]))
    weights = [p for n, p in pipe.unet.named_parameters() if p.dim() > 1]
    assert 0.015 < torch.cat([w.float().flatten() for w in weights]).std() < 0.025  # the init's N(0, 0.02)
    image = pipe.vae.decode(torch.zeros(1, pipe.vae.config.latent_channels, 4, 4, dtype=dtype)).sample
    assert image.dtype == dtype and torch.isfinite(image).all()
