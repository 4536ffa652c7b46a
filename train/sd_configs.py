"""U-Net configs of the public SD-1.x / SD-2.x teachers (block-removal.md section 1).

Enough to count parameters on the meta device or to build random-weight models at real widths
for benchmarks and export tests, with nothing downloaded.
"""

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False,
)
SD21_BASE_UNET = {**SD15_UNET, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
                  "use_linear_projection": True}
SD21_UNET = {**SD21_BASE_UNET, "sample_size": 96, "upcast_attention": True}
