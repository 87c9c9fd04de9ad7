"""The evaluation suite: distribution metrics, precision/recall, diversity, CLIP score, latency,
reference caching, and run_evaluation on tiny digits and Stable Diffusion pipelines."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from stepdistill.errors import StepdistillError
from stepdistill.evaluation import (
    clip_score,
    extract_features,
    fid_from_features,
    inception_features,
    kid_from_features,
    load_prompts,
    measure_latency,
    per_condition_diversity,
    precision_recall,
    reference_features,
    run_evaluation,
)
from stepdistill.evaluation.features import clean_resize
from stepdistill.metrics import frechet_distance

LATENCY_FIELDS = {"ms_per_image", "images_per_second", "peak_memory_mib"}


class TinyConvFeatures(nn.Module):
    """A random conv feature network for 3-channel images of any size: [0, 1] -> [B, 16]."""

    def __init__(self, in_channels: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 16))
        self.num_features = 16

    def forward(self, images):
        return self.net(images.float())


# --- FD / KID ------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero():
    features = torch.randn(300, 12, generator=torch.Generator().manual_seed(0))
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-6)
    images = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert fid_from_features(extract_features(images, TinyConvFeatures()), extract_features(images, TinyConvFeatures())) < 1e-6


def test_fid_grows_monotonically_as_a_set_is_shifted_further():
    features = torch.randn(500, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shifts = [0.0, 0.25, 0.5, 1.0, 2.0]
    fids = [fid_from_features(features, features + s) for s in shifts]
    assert all(a < b for a, b in zip(fids, fids[1:]))
    # A pure mean shift changes only the mean term: FD = |shift|^2 = 8 s^2.
    assert fids == pytest.approx([8 * s * s for s in shifts], abs=1e-6)


def test_fid_grows_as_real_digits_are_brightened_further():
    from stepdistill.digits.classifier import feature_module
    from stepdistill.digits.data import load_split

    real = load_split("all").images
    feature = feature_module()
    reference = extract_features(real, feature)
    fids = [fid_from_features(reference, extract_features((real + s).clamp(-1, 1), feature)) for s in (0.0, 0.2, 0.5, 1.0)]
    assert fids[0] < 1e-6
    assert all(a < b for a, b in zip(fids, fids[1:]))


def test_fid_from_features_equals_the_image_level_frechet_distance():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(80, 3, 8, 8, generator=generator) * 2 - 1
    b = (torch.rand(60, 3, 8, 8, generator=generator) * 2 - 1) * 0.5
    feature = TinyConvFeatures()
    ours = fid_from_features(extract_features(a, feature), extract_features(b, feature))
    assert ours == pytest.approx(frechet_distance(a, b, feature), rel=1e-6)


def test_kid_is_seeded_and_grows_with_the_shift():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=generator)
    fake = torch.randn(300, 8, generator=generator)
    kids = [kid_from_features(real, fake + s, subsets=20, subset_size=100, seed=3)[0] for s in (0.0, 0.5, 1.0)]
    assert abs(kids[0]) < kids[1] < kids[2]
    assert kid_from_features(real, fake, subsets=20, subset_size=100, seed=3) == kid_from_features(real, fake, subsets=20, subset_size=100, seed=3)


def test_kid_is_the_raw_cubic_kernel_mmd_and_scales_with_the_features():
    """The unit of the KID column: torchmetrics' MMD² with k(x, y) = (x.y / d + 1)^3 on the raw
    features, not x 1000 -- so features of a larger scale give a far larger KID (the digits
    classifier's, with x.x / d ~ 23, give KIDs in the hundreds)."""
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(60, 8, generator=generator, dtype=torch.float64)
    fake = torch.randn(60, 8, generator=generator, dtype=torch.float64) + 0.5
    d, m = real.shape[1], real.shape[0]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    by_hand = ((k(real, real).sum() - k(real, real).diag().sum() + k(fake, fake).sum() - k(fake, fake).diag().sum()) / (m * (m - 1))
               - 2 * k(real, fake).sum() / m**2)
    kid, std = kid_from_features(real, fake, subsets=1, subset_size=m)  # one subset = the whole sets, permuted
    assert kid == pytest.approx(float(by_hand), rel=1e-9) and std == 0
    scaled, _ = kid_from_features(4 * real, 4 * fake, subsets=1, subset_size=m)
    assert scaled > 100 * kid  # (16 x.y / d + 1)^3: the kernel, hence KID, grows with the features' scale


# --- precision / recall / diversity ------------------------------------------------------------


def _uniform(n, seed, low=(0.0, 0.0), high=(1.0, 1.0)):
    low, high = torch.tensor(low), torch.tensor(high)
    return low + (high - low) * torch.rand(n, 2, generator=torch.Generator().manual_seed(seed))


def test_precision_recall_of_a_half_covering_generator():
    """Real: uniform on the unit square; generated: uniform on its left half. Every generated
    sample is realistic (precision 1), half the real data is covered (recall 1/2)."""
    scores = precision_recall(_uniform(2000, 0), _uniform(2000, 1, high=(0.5, 1.0)), k=3)
    assert scores["precision"] == pytest.approx(1.0, abs=0.05)
    assert scores["recall"] == pytest.approx(0.5, abs=0.05)


def test_precision_recall_of_matching_disjoint_and_half_off_distributions():
    real = _uniform(2000, 0)
    same = precision_recall(real, _uniform(2000, 1), k=3)
    assert same["precision"] == pytest.approx(1.0, abs=0.05) and same["recall"] == pytest.approx(1.0, abs=0.05)
    far = precision_recall(real, _uniform(2000, 2, low=(5.0, 5.0), high=(6.0, 6.0)), k=3)
    assert far == {"precision": 0.0, "recall": 0.0}
    # Half the generated samples on the data, half far away: precision 1/2, recall stays ~1.
    mixed = torch.cat([_uniform(1000, 3), _uniform(1000, 4, low=(5.0, 5.0), high=(6.0, 6.0))])
    scores = precision_recall(real, mixed, k=3)
    assert scores["precision"] == pytest.approx(0.5, abs=0.05)
    assert scores["recall"] > 0.9


def test_per_condition_diversity_is_the_mean_within_condition_distance():
    # condition 0: two points 3 apart; condition 1: two points 5 apart; condition 2: one sample (ignored)
    features = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 0.0], [0.0, 5.0], [9.0, 9.0]])
    groups = torch.tensor([0, 0, 1, 1, 2])
    assert per_condition_diversity(features, groups) == pytest.approx(4.0)
    collapsed = torch.tensor([[1.0, 2.0], [1.0, 2.0], [7.0, 0.0], [7.0, 0.0]])
    assert per_condition_diversity(collapsed, torch.tensor([0, 0, 1, 1])) == 0.0
    assert per_condition_diversity(features[:1], groups[:1]) is None


# --- prompts --------------------------------------------------------------------------------


def test_prompt_files_in_every_supported_format(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    (tmp_path / "p.csv").write_text('image_id,caption\n1,a cat\n2,"a dog, sitting"\n')
    (tmp_path / "p.jsonl").write_text('{"image_id": 1, "caption": "a cat"}\n"a dog"\n')
    (tmp_path / "p.json").write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a cat"}, {"caption": "a dog"}]}))
    assert load_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    assert load_prompts(tmp_path / "p.csv") == ["a cat", "a dog, sitting"]
    assert load_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog"]
    assert load_prompts(tmp_path / "p.json") == ["a cat", "a dog"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "not found"),
        ("bad.txt", b"\xff\xfe\xfa not utf-8", "cannot read prompts file"),
        ("empty.txt", b"\n\n", "holds no prompts"),
        ("cols.csv", b"id,url\n1,x\n", "caption/prompt/text column"),
        ("bad.jsonl", b'{"caption": "ok"}\n{not json\n', "bad.jsonl:2: not valid JSON"),
        ("p.yaml", b"- a cat\n", "must end in .txt"),
    ],
)
def test_bad_prompt_files_are_one_line_errors(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(StepdistillError, match=message) as info:
        load_prompts(tmp_path / name)
    assert "\n" not in str(info.value)


# --- real images and the reference cache -------------------------------------------------------


def _write_images(folder, count, size=(16, 16), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_reference_features_are_computed_once_and_cached(tmp_path):
    folder = _write_images(tmp_path / "real", 12)
    feature = TinyConvFeatures()
    first, info = reference_features(folder, feature, channels=3, cache_dir=tmp_path / "cache", batch_size=5)
    assert not info["cache_hit"] and info["num_images"] == 12 and first.shape == (12, 16)
    again, info = reference_features(folder, feature, channels=3, cache_dir=tmp_path / "cache")
    assert info["cache_hit"] and torch.equal(first, again)
    # The cached features are the features of the images (not of something else).
    from stepdistill.evaluation.reference import list_images, load_images

    direct = extract_features(load_images(list_images(folder), 3), feature)
    assert torch.allclose(first, direct, atol=1e-6)
    # Another feature network, or a changed folder, is a cache miss.
    _, info = reference_features(folder, TinyConvFeatures(seed=1), channels=3, cache_dir=tmp_path / "cache")
    assert not info["cache_hit"]
    _write_images(folder, 13, seed=5)
    changed, info = reference_features(folder, feature, channels=3, cache_dir=tmp_path / "cache")
    assert not info["cache_hit"] and changed.shape[0] == 13


def test_empty_and_mixed_size_image_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(StepdistillError, match="holds no images"):
        reference_features(tmp_path / "empty", TinyConvFeatures(), cache_dir=tmp_path / "cache")
    folder = _write_images(tmp_path / "mixed", 2, size=(16, 16))
    Image.new("RGB", (20, 16)).save(folder / "zz.png")
    with pytest.raises(StepdistillError, match=r"one size: 000.png is 16x16, zz.png is 20x16"):
        reference_features(folder, TinyConvFeatures(), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# --- Inception --------------------------------------------------------------------------------


def test_inception_without_torch_fidelity_or_weights_says_what_is_missing(tmp_path):
    import importlib.util

    with pytest.raises(StepdistillError) as info:
        inception_features(None)
    message = str(info.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message and "--inception-weights" in message
    if importlib.util.find_spec("torch_fidelity") is None:
        assert "torch-fidelity" in message
    with pytest.raises(StepdistillError, match="not found"):
        inception_features(tmp_path / "nope.pth")


def test_clean_resize_makes_299_uint8_and_keeps_flat_images_flat():
    flat = torch.full((2, 3, 8, 8), 0.5)
    out = clean_resize(flat)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 299, 299)
    assert int(out.min()) == int(out.max()) == 128
    ramp = torch.linspace(0, 1, 32).repeat(1, 1, 32, 1)
    resized = clean_resize(ramp)[0, 0].float()
    assert (resized[:, 1:] >= resized[:, :-1] - 1).all()  # a horizontal ramp stays (weakly) increasing


# --- CLIP score -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    from tiny_pipelines import tiny_clip_tokenizer

    text = CLIPTextConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          max_position_embeddings=16, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=8)
    torch.manual_seed(6)  # a seed whose prompt-image similarities are positive (CLIP score floors at 0)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8)).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tiny_clip_tokenizer(),
    )
    directory = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _manual_clip_score(directory, images, prompts):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(directory).eval()
    processor = CLIPProcessor.from_pretrained(directory)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8)
    with torch.no_grad():
        image = model.get_image_features(**processor(images=list(pixels), return_tensors="pt"))
        text = model.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True))
    image = image if torch.is_tensor(image) else image.pooler_output
    text = text if torch.is_tensor(text) else text.pooler_output
    cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    return float(100 * cosine.mean())


def test_clip_score_with_a_tiny_clip_from_a_local_directory(tiny_clip_dir):
    prompts = ["a cat", "a dog", "a red car", "two birds", "a cat", "the sea"]
    images = torch.rand(6, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    manual = _manual_clip_score(tiny_clip_dir, images, prompts)
    assert manual > 0
    assert clip_score(images, prompts, tiny_clip_dir, batch_size=4) == pytest.approx(manual, abs=1e-3)
    # Other pairings of the same images and prompts score what the model says they score.
    shuffled = prompts[1:] + prompts[:1]
    expected = max(_manual_clip_score(tiny_clip_dir, images, shuffled), 0.0)
    assert clip_score(images, shuffled, tiny_clip_dir) == pytest.approx(expected, abs=1e-3)
    with pytest.raises(StepdistillError, match="one prompt per image"):
        clip_score(images, prompts[:2], tiny_clip_dir)
    with pytest.raises(StepdistillError, match="CLIP model directory not found"):
        clip_score(images, prompts, tiny_clip_dir.parent / "missing")


# --- latency ----------------------------------------------------------------------------------


class _Denoiser(nn.Module):
    def forward(self, x, t=None):
        return x * 0.5


def test_latency_counts_denoiser_evaluations_per_image_with_and_without_cfg():
    denoiser = _Denoiser()

    def sampler(steps, cfg, batch=4):
        def generate():
            x = torch.randn(batch, 2)
            for _ in range(steps):
                denoiser(torch.cat([x, x]) if cfg else x, 0)
            return batch
        return generate

    plain = measure_latency(sampler(3, cfg=False), denoiser, repeats=2)
    guided = measure_latency(sampler(3, cfg=True), denoiser, repeats=2)
    assert plain["nfe"] == 3 and guided["nfe"] == 6
    assert plain["latency_batch_size"] == 4 and plain["ms_per_image"] > 0 and plain["images_per_second"] > 0
    # the process's peak RSS (this process holds torch: well over 50 MiB), never a delta that rounds to 0
    assert plain["peak_memory_kind"] in ("cpu_peak_rss", "cpu_peak_rss_since_start") and plain["peak_memory_mib"] > 50
    assert not denoiser._forward_hooks  # the counting hook is removed afterwards


# --- run_evaluation on tiny pipelines ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_digits_dir(tmp_path_factory):
    """A random-weight class-conditional digits pipeline in the shipped (exported) format."""
    from diffusers import DDIMScheduler, UNet2DModel

    from stepdistill.export import save_class_conditional_pipeline

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, num_class_embeds=11)
    scheduler = DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing")
    return save_class_conditional_pipeline(unet, scheduler, tmp_path_factory.mktemp("digits") / "tiny-teacher")


def _comparable(rows):
    return [{k: v for k, v in row.items() if k not in LATENCY_FIELDS} for row in rows]


def test_eval_fd_equals_the_digits_bench_fd(tiny_digits_dir, tmp_path):
    from stepdistill.digits.bench import run_bench

    bench = run_bench(tiny_digits_dir, None, num_samples=40, steps=(1, 2), guidance_scales=(2.0,), batch_size=16,
                      seed=3, save_grids=False, progress=False)
    results = run_evaluation([tiny_digits_dir], tmp_path / "eval", num_samples=40, steps=(1, 2), guidance_scales=(2.0,),
                             batch_size=16, seed=3, latency_batch_size=4, latency_repeats=1, progress=False)
    ours = {(r["steps"], r["guidance_scale"]): (r["fd"], r["accuracy"]) for r in results["rows"]}
    theirs = {(r["steps"], r["guidance_scale"]): (r["fd"], r["accuracy"]) for r in bench["rows"]}
    assert ours == theirs
    assert results["noise_floor"]["fd"] == pytest.approx(bench["noise_floor"]["fd"])


def test_eval_twice_gives_the_same_numbers_and_updates_the_model_card_only_when_asked(tiny_digits_dir, tmp_path):
    kwargs = dict(num_samples=30, steps=(1, 3), batch_size=16, seed=0, latency_batch_size=4, latency_repeats=1,
                  progress=False, noise_floor=False, command="stepdistill eval tiny --num-samples 30")
    card_before = (tiny_digits_dir / "README.md").read_text()
    first = run_evaluation([tiny_digits_dir], tmp_path / "a", **kwargs)
    assert (tiny_digits_dir / "README.md").read_text() == card_before and "model_cards" not in first
    second = run_evaluation([tiny_digits_dir], tmp_path / "b", update_model_cards=True, **kwargs)
    assert _comparable(first["rows"]) == _comparable(second["rows"])
    for name in ("metrics.json", "metrics.md", "samples.png", "plot.png"):
        assert (tmp_path / "a" / name).is_file()
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert _comparable(saved["rows"]) == _comparable(first["rows"])
    assert [r["nfe"] for r in saved["rows"]] == [1, 3]
    for row in saved["rows"]:
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and row["diversity"] > 0 and row["kid"] is not None
        assert row["kid_std"] > 0 and row["peak_memory_mib"] > 0
    assert second["model_cards"] == [str(tiny_digits_dir / "README.md")]
    card = (tiny_digits_dir / "README.md").read_text()
    assert f"| 1 | 1.00 | 30 | 1 | {first['rows'][0]['fd']:.2f} |" in card and "stepdistill eval tiny --num-samples 30" in card
    assert f"{first['rows'][0]['kid']:.4g} ± {first['rows'][0]['kid_std']:.4g}" in card
    assert card.split("<!-- stepdistill:metrics:start -->")[0].split("---\n", 2)[2] == card_before.split("<!-- stepdistill:metrics:start -->")[0].split("---\n", 2)[2]
    report = (tmp_path / "a" / "metrics.md").read_text()
    assert "peak memory (MiB)" in report and "can then be slightly negative" in report and "KID ↓ (mean ± std, raw)" in report


@pytest.fixture(scope="module")
def tiny_sd_dirs(tmp_path_factory):
    """A tiny SD teacher (DDIM) and the same weights with a TCD scheduler (a stand-in student)."""
    from diffusers import TCDScheduler

    from tiny_pipelines import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("sd")
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(root / "teacher")
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(root / "tcd-student")
    return root / "teacher", root / "tcd-student"


def test_eval_of_text_to_image_pipelines_with_fid_clip_and_tcd_gamma(tiny_sd_dirs, tiny_clip_dir, tmp_path):
    teacher, student = tiny_sd_dirs
    prompts = tmp_path / "captions.jsonl"
    prompts.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in enumerate(["a cat", "a dog", "a red car"])))
    real = _write_images(tmp_path / "real", 10, size=(32, 32))
    results = run_evaluation(
        [teacher, student], tmp_path / "eval", names=["teacher", "student"], prompts_file=prompts, samples_per_prompt=2,
        steps=(1, 2), guidance_scales=(1.0, 3.0), gammas=(0.0, 0.5), real_dir=real, feature=TinyConvFeatures(),
        reference_cache_dir=tmp_path / "cache", clip_model=tiny_clip_dir, batch_size=6, latency_batch_size=2,
        latency_repeats=1, progress=False,
    )
    rows = results["rows"]
    # The DDIM teacher has no gamma; the TCD student is swept over it.
    assert {(r["steps"], r["guidance_scale"], r["gamma"]) for r in rows if r["model"] == "teacher"} == {
        (s, w, None) for s in (1, 2) for w in (1.0, 3.0)}
    assert {r["gamma"] for r in rows if r["model"] == "student"} == {0.0, 0.5}
    for row in rows:
        assert row["num_samples"] == 6 and row["fd"] >= 0 and row["clip_score"] >= 0 and row["diversity"] > 0
        assert row["nfe"] == row["steps"] * (2 if row["guidance_scale"] > 1 else 1)
    for name in ("metrics.json", "metrics.md", "samples.png", "plot.png"):
        assert (tmp_path / "eval" / name).is_file()
    assert results["reference"]["num_images"] == 10 and not results["reference"]["cache_hit"]
    assert "| teacher | 1 |" in (tmp_path / "eval" / "metrics.md").read_text()


def test_training_evaluator_reports_the_bench_fd_and_the_eval_metrics():
    from stepdistill.digits.bench import evaluate_samples
    from stepdistill.digits.data import load_split
    from stepdistill.digits.plugin import digits_reference
    from stepdistill.evaluation import make_evaluator

    heldout = load_split("heldout")
    images, labels = heldout.images[:100], heldout.labels[:100]
    metrics = make_evaluator(digits_reference(), kid_subsets=10)(images, labels)
    bench = evaluate_samples(images, labels)
    assert metrics["fd"] == bench["fd"] and metrics["accuracy"] == bench["accuracy"]
    assert set(metrics) == {"fd", "accuracy", "kid", "kid_std", "precision", "recall", "diversity"}
    assert metrics["precision"] == 1.0  # held-out digits are part of the reference: each is a ball's centre


def test_eval_of_a_stock_unconditional_ddim_pipeline_against_a_grey_image_folder(tmp_path):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "ddim")
    from stepdistill.digits.data import load_split

    real = tmp_path / "real"
    real.mkdir()
    for i, image in enumerate(load_split("heldout").images[:40]):
        Image.fromarray(((image[0] + 1) * 127.5).round().byte().numpy()).save(real / f"{i:02d}.png")
    results = run_evaluation([tmp_path / "ddim"], tmp_path / "eval", num_samples=20, steps=(1, 2), guidance_scales=(1.0, 2.0),
                             real_dir=real, feature="digits", reference_cache_dir=tmp_path / "cache", batch_size=8,
                             latency_batch_size=4, latency_repeats=1, progress=False)
    assert [(r["steps"], r["guidance_scale"], r["nfe"]) for r in results["rows"]] == [(1, None, 1), (2, None, 2)]
    assert all(r["fd"] > 0 and "accuracy" not in r and r["diversity"] > 0 for r in results["rows"])
    assert results["conditions"]["kind"] == "none" and results["reference"]["num_images"] == 40
    # The real folder is read as grey images: its cached features are those of the digits themselves.
    from stepdistill.digits.classifier import feature_module

    cached, info = reference_features(real, feature_module(), channels=1, cache_dir=tmp_path / "cache")
    assert info["cache_hit"]
    direct = extract_features(load_split("heldout").images[:40], feature_module())
    assert (cached - direct).abs().max() < 0.01 * direct.abs().max()  # up to the PNGs' 8-bit rounding
