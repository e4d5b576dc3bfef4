"""The density-guided diffusers-style pipeline on tiny random pipelines saved to folders:
a pixel-space UNet2DModel pipeline and a latent text-to-image pipeline built from configs."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffdensity.integrations.pipeline import DensityGuidedPipeline, DensityPipelineOutput  # noqa: E402
from diffdensity.sampling import METHODS  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:density guidance asked for more:RuntimeWarning"),
]


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pixel_folder(tmp_path_factory):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    path = tmp_path_factory.mktemp("pixel")
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(path, safe_serialization=True)
    return path


def tiny_tokenizer(folder):
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=6)


@pytest.fixture(scope="module")
def latent_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                          cross_attention_dim=12, norm_num_groups=4, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
                                  norm_num_groups=4, layers_per_block=1, sample_size=16)
    tokenizer = tiny_tokenizer(path / "tok-src")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=12, intermediate_size=24, num_hidden_layers=1,
                                                                  num_attention_heads=2, max_position_embeddings=6, bos_token_id=0, eos_token_id=1))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=diffusers.DDIMScheduler(),
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path / "pipe", safe_serialization=True)
    return path / "pipe"


def test_pixel_pipeline_returns_images_with_log_densities(pixel_folder):
    pipe = DensityGuidedPipeline.from_pretrained(pixel_folder)
    out = pipe(q=0.8, num_inference_steps=4, batch_size=2, generator=gen(0), output_type="pt")
    assert isinstance(out, DensityPipelineOutput) and out.method == "density-guidance"
    assert out.images.shape == (2, 3, 8, 8) and 0 <= float(out.images.min()) and float(out.images.max()) <= 1
    assert out.logp.shape == (2,) and torch.isfinite(out.logp).all() and torch.isfinite(out.bits_per_dim).all()
    assert out.logp_stderr is None or out.logp_stderr.shape == (2,)
    assert "mean logp" in repr(out) and len(repr(out)) < 200
    pil = pipe(num_inference_steps=2, generator=gen(0)).images
    assert len(pil) == 1 and pil[0].size == (8, 8)
    images, logp = pipe(num_inference_steps=2, generator=gen(0), return_dict=False, output_type="np")
    assert images.shape == (1, 8, 8, 3) and logp.shape == (1,)


def test_pixel_pipeline_runs_every_method(pixel_folder):
    pipe = DensityGuidedPipeline.from_pretrained(pixel_folder)
    options = {"density-guidance": {"q": 0.3}, "stochastic-density-guidance": {"q": 0.7}, "prior-guidance": {"q": 0.7},
               "custom": {"drift": lambda x, t, score: -0.5 * x}}  # a user ODE: any drift
    for method in METHODS:
        out = pipe(method=method, num_inference_steps=3, generator=gen(1), output_type="pt", **options.get(method, {}))
        assert out.method == method and torch.isfinite(out.logp).all(), method


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_q_orders_the_mean_log_density(kind, pixel_folder, latent_folder):
    pipe = DensityGuidedPipeline.from_pretrained(pixel_folder if kind == "pixel" else latent_folder)
    call = dict(batch_size=3) if kind == "pixel" else dict(prompt="a cat", num_images_per_prompt=3, guidance_scale=2.0)
    means = [float(pipe(q=q, num_inference_steps=6, generator=gen(2), output_type="pt", **call).logp.mean()) for q in (0.2, 0.5, 0.8)]
    assert means[0] < means[1] < means[2], means


def test_latent_text_pipeline_decodes_prompts(latent_folder):
    pipe = DensityGuidedPipeline.from_pretrained(latent_folder)
    assert pipe.is_latent and pipe.text_encoder is not None
    out = pipe(prompt=["a cat", "a dog"], negative_prompt="", q=0.7, guidance_scale=3.0, num_inference_steps=3, generator=gen(3))
    assert len(out.images) == 2 and out.images[0].size == (16, 16)
    assert out.logp.shape == (2,) and torch.isfinite(out.logp).all() and out.bits_per_dim is None
    with pytest.raises(ValueError, match="prompt="):
        pipe(num_inference_steps=2)


def test_refusals_name_the_argument(pixel_folder, tmp_path):
    pipe = DensityGuidedPipeline.from_pretrained(pixel_folder)
    with pytest.raises(ValueError, match="no text encoder"):
        pipe(prompt="a cat", num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="jpeg")
    bad = tmp_path / "bad"
    (bad / "text_encoder").mkdir(parents=True)
    (bad / "tokenizer").mkdir()
    (bad / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["EvilModel"]}))
    from diffdensity.integrations.pipeline import _allowed_class, TEXT_ENCODERS

    with pytest.raises(ValueError, match="EvilModel"):
        _allowed_class(bad / "text_encoder" / "config.json", "architectures", TEXT_ENCODERS)


def test_latents_follow_the_network_dtype(pixel_folder, latent_folder):
    pipe = DensityGuidedPipeline.from_pretrained(pixel_folder, torch_dtype=torch.float64)
    out = pipe(num_inference_steps=2, generator=gen(4), output_type="pt")
    assert out.result.x_T.dtype == torch.float64 and out.result.x.dtype == torch.float64
    latent = DensityGuidedPipeline.from_pretrained(latent_folder)
    out = latent(prompt="a cat", guidance_scale=1.0, num_inference_steps=2, generator=gen(5), output_type="pt")
    assert out.result.x_T.dtype == next(latent.model.base.network.parameters()).dtype and out.images.shape == (1, 3, 16, 16)
