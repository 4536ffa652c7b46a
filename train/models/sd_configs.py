"""Configs of the public SD-1.x / SD-2.x / SDXL models (block-removal.md sections 1 and 6) and the SDXS-512 layout.

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
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the keys that shape the U-Net (2,567,463,684 params).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048, attention_head_dim=[5, 10, 20], use_linear_projection=True,
    # pooled OpenCLIP-bigG text (1280) + 6 size/crop time ids x 256 = 2816
    addition_embed_type="text_time", addition_time_embed_dim=256, addition_embed_type_num_heads=64,
    projection_class_embeddings_input_dim=2816,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
# CLIP-L; bos/eos/pad as the toy tokenizer numbers them (the vocabulary size is CLIP's).
SD15_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
# OpenCLIP-H as SD-2.x ships it in diffusers: 23 of its 24 layers (SD-2 conditions on the penultimate
# layer's output, so the last layer is dropped), GELU; bos/eos/pad as the toy tokenizer numbers them.
SD21_TEXT = {**SD15_TEXT, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
             "num_hidden_layers": 23, "hidden_act": "gelu", "projection_dim": 512}
# SDXL's two text encoders (stabilityai/stable-diffusion-xl-base-1.0): CLIP-L as SD-1.5's, and OpenCLIP-bigG with
# its pooled projection (all 32 layers; SDXL conditions on the penultimate one), GELU.
SDXL_TEXT = SD15_TEXT
SDXL_TEXT_2 = {**SD15_TEXT, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
               "num_hidden_layers": 32, "hidden_act": "gelu", "projection_dim": 1280}
SDXS_TYPES = dict(  # the SDXS-512 U-Net layout: bk_tiny without the 320-channel attention
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)
