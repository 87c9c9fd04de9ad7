"""The ``stepdistill`` command line.

    stepdistill train-teacher configs/digits_teacher.yaml --output-dir runs/teacher
    stepdistill distill configs/digits_dmd2.yaml --output-dir runs/digits_dmd2 [--set key.sub=value ...]
    stepdistill train-classifier --output outputs/digits_classifier.safetensors
    stepdistill bench digits [PIPELINE_DIR]
    stepdistill bench overhead RECIPE [--set key.sub=value ...]
    stepdistill bench t2i DIR_OR_NAME --steps 1 2 4 --guidance-scale 1 4 [--num-samples N] [--json]
    stepdistill bench t2i [PIPELINE_DIR_OR_NAME] --ladder [--num-samples N] [--json]
    stepdistill export RUN_DIR OUTPUT_DIR
    stepdistill hybrid STUDENT_DIR OUTPUT_DIR --teacher digits --teacher-steps 1
    stepdistill plan configs/sdxl_dmd2.yaml --set teacher.path=DIR [--gpus 24 48 80]
    stepdistill curve RUN_DIR [RUN_DIR ...] --output curve.png
    stepdistill sample PIPELINE_DIR --output grid.png
    stepdistill data shapes OUTPUT_DIR [--num-images N] [--seed S]
    stepdistill data t2i OUTPUT_DIR [--seed S] [--train-images N] [--test-images N] [--heldout-images N]
    stepdistill features ladder REAL_DIR OTHER_REAL_DIR --feature random-conv

Every subcommand imports its heavy modules lazily, so ``--help`` is instant. Bad input
(:class:`~stepdistill.errors.StepdistillError`) is printed as one line and exits with status 2.
SIGTERM or Ctrl-C during training writes a checkpoint at the next step boundary and exits with
128 + the signal number (143 / 130) and one line; ``--resume`` continues the run.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import StepdistillError, TrainingInterrupted


def _cmd_train_teacher(args: argparse.Namespace) -> None:
    from .training.teacher import train_teacher

    out = train_teacher(args.recipe, args.output_dir, resume=args.resume, overwrite=args.overwrite, set_items=args.set)
    print(f"{'autoencoder' if out.name == 'vae' else 'teacher pipeline'} written to {out}")


def _cmd_distill(args: argparse.Namespace) -> None:
    from .distillers.run import distill, load_recipe_teacher, open_run_data

    if args.make_pairs:
        from .distillers.registry import load_distill_recipe, method_class

        recipe = load_distill_recipe(args.recipe, set_items=args.set)
        method = method_class(recipe.method)
        if not method.caches_pairs:  # refused before the teacher loads
            raise StepdistillError(f"--make-pairs is for methods that train on cached teacher ODE pairs; {args.recipe} is a {recipe.method} recipe")
        teacher = load_recipe_teacher(recipe)
        path = method.make_pairs(recipe, teacher, open_run_data(teacher, recipe).pool, args.make_pairs)
        print(f"teacher ODE pairs written to {path}")
        return
    out = distill(args.recipe, args.output_dir, set_items=args.set, resume=args.resume, overwrite=args.overwrite)
    print(f"student written to {out}")


def _cmd_hybrid(args: argparse.Namespace) -> None:
    from .hybrid import save_hybrid_pipeline

    out = save_hybrid_pipeline(args.student_dir, args.teacher, args.output_dir, teacher_steps=args.teacher_steps,
                               teacher_guidance_scale=args.teacher_guidance_scale, num_inference_steps=args.num_inference_steps,
                               overwrite=args.overwrite)
    print(f"hybrid pipeline written to {out}")


def _cmd_plan(args: argparse.Namespace) -> None:
    from .distillers.plan import plan_recipe
    from .distillers.registry import load_distill_recipe

    recipe = load_distill_recipe(args.recipe, set_items=args.set)
    print(plan_recipe(recipe, gpus=args.gpus, headroom=args.headroom, num_processes=args.processes))


def _cmd_curve(args: argparse.Namespace) -> None:
    from .evaluation.report import save_training_curves

    references = {}
    for item in args.reference or []:
        label, _, value = item.rpartition("=")
        try:
            references[label] = float(value)
        except ValueError:
            raise StepdistillError(f"--reference takes LABEL=VALUE; got {item!r}") from None
    print(f"curve written to {save_training_curves(args.run_dirs, args.output, names=args.names, metric=args.metric, references=references, log_scale=args.log)}")


def _cmd_train_classifier(args: argparse.Namespace) -> None:
    from .digits.classifier import train_classifier

    _, heldout_accuracy = train_classifier(args.output, seed=args.seed)
    print(f"digits classifier written to {args.output} (held-out accuracy {heldout_accuracy:.4f})")


def _cmd_bench(args: argparse.Namespace) -> None:
    if args.benchmark == "overhead":
        from .distillers.overhead import bench_overhead

        if args.pipeline_dir is None:
            raise StepdistillError("bench overhead needs a distillation RECIPE (e.g. configs/sd15_dmd2.yaml --set teacher.path=DIR)")
        print(bench_overhead(args.pipeline_dir, set_items=args.set, rounds=args.rounds))
        return
    if args.benchmark == "t2i":
        _cmd_bench_t2i(args)
        return
    from .digits.bench import DEFAULT_GUIDANCE_SCALES, DEFAULT_STEPS, format_table, run_bench

    output_dir = args.output_dir or "outputs/bench"
    results = run_bench(
        pipeline_dir=args.pipeline_dir,
        output_dir=output_dir,
        num_samples=2000 if args.num_samples is None else args.num_samples,
        steps=tuple(args.steps or DEFAULT_STEPS),
        guidance_scales=tuple(args.guidance_scales or DEFAULT_GUIDANCE_SCALES),
        batch_size=256 if args.batch_size is None else args.batch_size,
        seed=args.seed,
    )
    print(format_table(results))
    print(f"\nwritten: {os.path.join(output_dir, 'bench.json')}, {os.path.join(output_dir, 'bench.md')}")


def _cmd_bench_t2i(args: argparse.Namespace) -> None:
    """``bench t2i DIR_OR_NAME``: the table, or with ``--json`` one JSON object (its ``rows``; with
    one (steps, guidance) its fields at the top level too). ``bench t2i --ladder``: the sanity ladder."""
    import json

    from .t2i import bench

    num_samples = bench.DEFAULT_NUM_SAMPLES if args.num_samples is None else args.num_samples
    heldout = bench.DEFAULT_HELDOUT_SAMPLES if args.heldout_samples is None else args.heldout_samples
    if args.ladder:
        rows = bench.ladder(num_samples, samples_per_prompt=args.samples_per_prompt, seed=args.seed, vae=args.pipeline_dir)
        print(json.dumps({"benchmark": "t2i", "ladder": True, "n": num_samples, "rows": rows}) if args.json else bench.format_ladder(rows))
        return
    if args.pipeline_dir is None:
        raise StepdistillError(f"bench t2i needs a pipeline directory or a teacher name ({', '.join(bench.TEACHERS)}), or --ladder")
    results = bench.run_bench(
        args.pipeline_dir,
        output_dir=args.output_dir,
        steps=tuple(args.steps or bench.DEFAULT_STEPS),
        guidance_scales=tuple(args.guidance_scales or bench.DEFAULT_GUIDANCE_SCALES),
        num_samples=num_samples,
        heldout_samples=heldout,
        samples_per_prompt=args.samples_per_prompt,
        batch_size=64 if args.batch_size is None else args.batch_size,
        seed=args.seed,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(bench.json_object(results)))
        return
    print(bench.format_table(results))
    if args.output_dir is not None:
        print(f"\nwritten: {os.path.join(args.output_dir, 'bench.json')}, {os.path.join(args.output_dir, 'bench.md')}")


def _cmd_export(args: argparse.Namespace) -> None:
    import json

    run_file = os.path.join(args.run_dir, "run.json")
    kind = json.load(open(run_file)).get("kind") if os.path.isfile(run_file) else None
    if kind == "distill":
        from .distillers.run import export_run_dir as export
    else:
        from .training.teacher import export_run as export
    out = export(args.run_dir, args.output_dir, ema=not args.no_ema, overwrite=args.overwrite)
    print(f"written to {out}")


def _cmd_sample(args: argparse.Namespace) -> None:
    from .sample import sample_grid

    path = sample_grid(
        args.pipeline_dir,
        args.output,
        class_labels=args.class_labels,
        num_images=args.num_images,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
    )
    print(f"sample grid written to {path}")


def _eval_command(args: argparse.Namespace) -> str:
    """The eval command with every option spelled out (what the model card and metrics.json record)."""
    import shlex

    parts = ["stepdistill", "eval", *args.pipeline_dirs]
    for key, value in vars(args).items():
        if key in ("func", "command", "pipeline_dirs") or value is None or value is False:
            continue
        parts.append("--" + key.replace("_", "-"))
        if isinstance(value, list):
            parts += [f"{v:g}" if isinstance(v, float) else str(v) for v in value]
        elif value is not True:
            parts.append(str(value))
    return shlex.join(parts)


def _cmd_eval(args: argparse.Namespace) -> None:
    import dataclasses

    from .evaluation.report import format_table
    from .evaluation import EvalOptions, run_evaluation

    renamed = {"prompts": "prompts_file", "reference_cache": "reference_cache_dir", "update_model_card": "update_model_cards"}
    given = {renamed.get(key, key): value for key, value in vars(args).items()}
    given["gammas"] = given["gammas"] or ()
    fields = {f.name for f in dataclasses.fields(EvalOptions)} - {"command"}  # args.command is the subcommand
    options = EvalOptions(**{key: value for key, value in given.items() if key in fields}, command=_eval_command(args))
    results = run_evaluation(args.pipeline_dirs, args.output_dir, options)
    print(format_table(results))
    print(f"features: {results['feature']}")
    outputs = results["outputs"]
    print(f"\nwritten: {outputs['metrics']}, {outputs['table']}, {outputs['samples']}, {outputs['plot']}")
    for card in results.get("model_cards", []):
        print(f"model card updated: {card}")
    for reason in results.get("model_cards_left_alone", []):
        print(f"model card left alone: {reason}")


def _cmd_data(args: argparse.Namespace) -> None:
    if args.dataset == "t2i":
        from .t2i.data import make_t2i

        counts = {k: v for k, v in (("train", args.train_images), ("test", args.test_images), ("heldout", args.heldout_images)) if v is not None}
        out = make_t2i(args.output_dir, counts=counts, seed=args.seed, overwrite=args.overwrite)
        print(f"t2i images (seed {args.seed}) written to {out}: train/, test/, heldout/ with metadata.jsonl captions")
        return
    from .shapes import make_shapes

    out = make_shapes(args.output_dir, num_images=args.num_images, seed=args.seed, size=args.size, overwrite=args.overwrite)
    print(f"{args.num_images} shapes images (seed {args.seed}, {args.size}x{args.size}) written to {out}")


def _cmd_features(args: argparse.Namespace) -> None:
    from .evaluation.feature_spaces import feature_spaces

    if args.action == "list":
        for name, description in feature_spaces().items():
            print(f"{name}: {description}")
        return
    from .evaluation.ladder import folder_ladder, format_ladder

    if args.other_real_dir is None:
        raise StepdistillError("features ladder needs two folders of real images: REAL_DIR OTHER_REAL_DIR")
    options = {} if args.inception_weights is None else {"inception_weights": args.inception_weights}
    ladder = folder_ladder(args.real_dir, args.other_real_dir, args.feature, num_samples=args.num_samples,
                           reference_samples=args.reference_samples, seed=args.seed, batch_size=args.batch_size, **options)
    print(f"features: {ladder['feature']}")
    print(f"reference: {ladder['num_reference']} images of {args.real_dir}; "
          f"real and corrupted: {ladder['num_samples']} images of {args.other_real_dir}\n")
    print(format_ladder(ladder["rows"]))


def _cmd_schema(args: argparse.Namespace) -> None:
    import json

    if args.kind == "teacher":
        from .training.teacher import teacher_recipe_schema

        schema = teacher_recipe_schema()
    else:
        from .distillers.registry import recipe_schema

        schema = recipe_schema()
    print(json.dumps(schema, indent=2))


SET_HELP = "override a recipe key (repeatable), validated like the file, e.g. --set training.max_steps=100"


def _add_train_teacher(sub) -> None:
    p = sub.add_parser("train-teacher", help="train a pixel teacher on an image folder / dataset and export it as a pipeline",
                       description="Train a pixel UNet2DModel teacher from a YAML recipe on the images it names "
                       "(data.images: an image folder, a `datasets` directory or `digits`) and export its EMA weights: "
                       "a stock DDPMPipeline (unconditional data) or a ClassConditionalPipeline (class sub-folders).")
    p.add_argument("recipe", help="YAML recipe, e.g. configs/digits_teacher.yaml or configs/shapes_teacher.yaml")
    p.add_argument("--output-dir", default="runs/teacher", help="run directory (checkpoints, logs, exported pipeline)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --output-dir")
    p.set_defaults(func=_cmd_train_teacher)


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="distill a few-step student from a teacher (DMD, DMD2, LCM, PCM ...)",
                       description="Train a few-step student with a distillation recipe (its `method:` picks the distiller) "
                       "and export it as a drop-in diffusers pipeline (OUTPUT_DIR/pipeline) or, for a LoRA student of a "
                       "latent teacher, a LoRA file (OUTPUT_DIR/lora). See docs/dmd2.md, docs/consistency.md, docs/guidance.md.")
    p.add_argument("recipe", help="YAML recipe, e.g. configs/digits_dmd2.yaml or configs/pixel_dmd2.yaml")
    p.add_argument("--output-dir", default="runs/distill", help="run directory (checkpoints, logs, curve, exported student)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --output-dir")
    p.add_argument("--make-pairs", type=int, default=0, metavar="N",
                   help="instead of training: cache N teacher ODE pairs (noise, sample) for DMD's regression loss (dmd.regression_pairs) "
                   "or reflow's couplings (reflow.pairs)")
    p.set_defaults(func=_cmd_distill)


def _add_hybrid(sub) -> None:
    p = sub.add_parser("hybrid", help="one pipeline directory running the teacher for the first k steps and the student for the rest",
                       description="Hybrid inference (Gandikota & Bau 2025, 'Distilling Diversity'): write a HybridClassConditionalPipeline "
                       "that carries the student and the teacher network; the first --teacher-steps steps of the student's scheduler "
                       "run the teacher (restoring the diversity few-step students lose), the rest the student. Class-conditional "
                       "pixel pipelines (digits); latent teachers: see docs/step_halving.md.")
    p.add_argument("student_dir", help="the student's ClassConditionalPipeline directory")
    p.add_argument("output_dir", help="where to write the hybrid pipeline directory")
    p.add_argument("--teacher", required=True, help="the teacher's pipeline directory, or a registered teacher name (digits)")
    p.add_argument("--teacher-steps", type=int, default=1, help="steps run by the teacher (default 1)")
    p.add_argument("--teacher-guidance-scale", type=float, default=1.0, help="the teacher's CFG, uncond + w (cond - uncond); 1 = none")
    p.add_argument("--num-inference-steps", type=int, default=None,
                   help="total steps (default: the student's, or teacher steps + the student's when it has no more)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_cmd_hybrid)


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="estimate a distillation recipe's memory per role, before loading any weight",
                       description="Per role (student, teacher, fake score, discriminator, EMA, text encoders, VAE): parameters, "
                       "weights, gradients, optimizer states and activations of the recipe's training step, built on the meta device "
                       "from the teacher directory's config files alone; a verdict per GPU size and the cheapest recipe change that "
                       "fits. See docs/memory.md.")
    p.add_argument("recipe", help="YAML distillation recipe, e.g. configs/sdxl_dmd2.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--gpus", type=float, nargs="+", default=[24, 48, 80], help="GPU memory sizes to judge, in GiB")
    p.add_argument("--headroom", type=float, default=1.2, help="a GPU fits when headroom x peak <= its memory")
    p.add_argument("--processes", type=int, default=1, help="data-parallel processes sharing training.batch_size")
    p.set_defaults(func=_cmd_plan)


def _add_curve(sub) -> None:
    p = sub.add_parser("curve", help="plot FD against training minutes from distillation runs' curve.jsonl",
                       description="Plot a metric of the periodic evaluation (curve.jsonl) against wall-clock minutes, "
                       "one line per run directory.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by `stepdistill distill`")
    p.add_argument("--output", default="curve.png", help="PNG to write")
    p.add_argument("--names", nargs="+", default=None, help="legend names (default: directory names)")
    p.add_argument("--metric", default="fd", help="column of curve.jsonl (fd, accuracy, precision, recall, ...)")
    p.add_argument("--reference", nargs="+", default=None, metavar="LABEL=VALUE", help="horizontal reference lines")
    p.add_argument("--log", action="store_true", help="logarithmic metric axis")
    p.set_defaults(func=_cmd_curve)


def _add_train_classifier(sub) -> None:
    p = sub.add_parser("train-classifier", help="retrain the digits classifier that defines the digits FD",
                       description="Retrain the digits classifier (its penultimate features define the digits FD; "
                       "its predictions give class accuracy). The package ships these weights already.")
    p.add_argument("--output", default="outputs/digits_classifier.safetensors", help="safetensors file to write")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train_classifier)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a reference benchmark (digits, t2i) on a pipeline directory",
                       description="FD and class accuracy at several step counts, with and without CFG, the noise "
                       "floor, and images/second. Writes bench.json and bench.md. t2i: prompt accuracy (overall, per "
                       "attribute, held-out pairs), FD, precision / recall and per-prompt diversity of a text-to-image "
                       "pipeline; --json prints one JSON object (`rows`; with one steps x guidance its fields at the top "
                       "level too); --ladder: the metrics' sanity ladder on real images.")
    p.add_argument("benchmark", choices=["digits", "overhead", "t2i"],
                   help="digits: the reference benchmark of a pipeline; overhead: a distillation recipe's training iteration "
                   "against its networks' bare forward+backward passes; t2i: the text-to-image benchmark")
    p.add_argument("pipeline_dir", nargs="?", default=None, metavar="PIPELINE_DIR | RECIPE",
                   help="digits: diffusers pipeline directory (default: the shipped digits teacher); overhead: a distillation recipe; "
                   "t2i: a text-to-image pipeline directory or a teacher name (t2i-sd, t2i-flow)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="overhead: " + SET_HELP)
    p.add_argument("--rounds", type=int, default=3, help="overhead: timed iterations, alternating with bare replays (medians)")
    p.add_argument("--output-dir", default=None, help="where bench.json and bench.md are written (digits default: outputs/bench; "
                   "t2i: only when given)")
    p.add_argument("--num-samples", type=int, default=None, help="samples per configuration (default 2000; t2i: seen-prompt "
                   "samples; compare FD only at equal N)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="step counts (default 1 2 4 10 50)")
    p.add_argument("--guidance-scales", "--guidance-scale", type=float, nargs="+", default=None,
                   help="CFG scales, convention uncond + w (cond - uncond); 1 = no guidance (default: digits 1 2, t2i 1 4)")
    p.add_argument("--batch-size", type=int, default=None, help="default: digits 256, t2i 64")
    p.add_argument("--heldout-samples", type=int, default=None, help="t2i: held-out-prompt samples (default 500; 0: none)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="t2i: seeds per prompt (per-prompt diversity needs >= 2)")
    p.add_argument("--json", action="store_true", help="t2i: print one JSON object instead of the table")
    p.add_argument("--ladder", action="store_true", help="t2i: the sanity ladder of both metrics on real images; with a PIPELINE_DIR / teacher name, also real images through its VAE")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_bench)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a training run's model as a diffusers pipeline directory (or LoRA file)",
                       description="Export the (EMA) weights of a training run (train-teacher or distill, any method and family) "
                       "as the run exports them at its end: a drop-in diffusers pipeline, or a LoRA file for LoRA students.")
    p.add_argument("run_dir", help="run directory written by train-teacher / distill")
    p.add_argument("output_dir", help="pipeline directory to write")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_cmd_export)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate a sample grid PNG from a pipeline directory",
                       description="Generate images with a class-conditional pipeline directory and save a grid PNG.")
    p.add_argument("pipeline_dir", help="diffusers pipeline directory")
    p.add_argument("--output", default="samples.png", help="PNG path for the grid")
    p.add_argument("--class-labels", type=int, nargs="+", default=None, help="labels to generate (default: each class in turn)")
    p.add_argument("--num-images", type=int, default=100, help="number of images when --class-labels is not given")
    p.add_argument("--steps", type=int, default=50, help="num_inference_steps")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale; 1 = no guidance")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_sample)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate pipeline directories: FD/FID, KID, precision/recall, diversity, CLIP, latency",
                       description="Evaluate one or more diffusers pipeline directories (teacher and students side by side) "
                       "over step counts, guidance scales and TCD gammas. Writes metrics.json, metrics.md, samples.png and "
                       "plot.png into --output-dir and nothing else: the evaluated directories are left as they are "
                       "unless --update-model-card. See docs/evaluation.md.")
    p.add_argument("pipeline_dirs", nargs="+", metavar="PIPELINE_DIR", help="diffusers pipeline directories")
    p.add_argument("--output-dir", default="outputs/eval", help="where the four outputs are written")
    p.add_argument("--names", nargs="+", default=None, help="model names for the table and plot (default: directory names)")
    p.add_argument("--prompts", default=None, help="prompts file for text-to-image pipelines (.txt, .csv, .jsonl, COCO captions .json)")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts (default: all)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="seeds per prompt (per-condition diversity needs >= 2)")
    p.add_argument("--class-labels", type=int, nargs="+", default=None, help="classes to cycle through (default: all, balanced)")
    p.add_argument("--num-samples", type=int, default=None, help="samples per configuration for class-conditional / "
                   "unconditional pipelines (default 2000; compare FD only at equal N)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 50], help="step counts")
    p.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0],
                   help="CFG scales, convention uncond + w (cond - uncond); 1 = no guidance")
    p.add_argument("--gammas", type=float, nargs="+", default=None, help="TCD gammas (pipelines with a TCDScheduler only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--real-dir", default=None, help="folder of real images (one size) for FID / KID / precision / recall")
    p.add_argument("--feature", default="auto",
                   help="feature space: auto (digits pipelines: digits; others: inception with --inception-weights, "
                   "else random-conv) or a registered name: inception, random-conv, digits, ... (stepdistill features list)")
    p.add_argument("--inception-weights", default=None,
                   help="local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (needs torch-fidelity)")
    p.add_argument("--reference-cache", default=None, help="cache folder for real-image features (default ~/.cache/stepdistill)")
    p.add_argument("--clip-model", default=None, help="local CLIP directory (CLIPModel + CLIPProcessor) for CLIP score")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID: random subsets of up to 1000 samples (cost grows linearly)")
    p.add_argument("--latency-batch-size", type=int, default=16, help="fixed batch for the latency measurement")
    p.add_argument("--update-model-card", action="store_true",
                   help="also write this run's rows and command into the model card (README.md) of each evaluated directory "
                   "that has one; never a directory inside an installed package (e.g. the shipped digits teacher)")
    p.set_defaults(func=_cmd_eval)


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="make a reference benchmark's image folder (shapes, t2i)",
                       description="Write the shapes benchmark's images: a flat folder of procedural RGB PNGs "
                       "(00000.png ...) and a README.md saying how it was made. See docs/shapes.md. t2i: train/, test/ "
                       "and heldout/ folders of captioned 32x32 scenes (metadata.jsonl), see docs/t2i.md.")
    p.add_argument("dataset", choices=["shapes", "t2i"], help="which data")
    p.add_argument("output_dir", help="folder to write (made atomically; must be empty or absent)")
    p.add_argument("--num-images", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0, help="0: the training folder and FD reference; 1: fresh images for the noise floor")
    p.add_argument("--size", type=int, default=16, help="image side in pixels")
    p.add_argument("--train-images", type=int, default=None, help="t2i: training-split images (default 10000)")
    p.add_argument("--test-images", type=int, default=None, help="t2i: test-split images (default 2000)")
    p.add_argument("--heldout-images", type=int, default=None, help="t2i: held-out-split images (default 500)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_data)


def _add_features(sub) -> None:
    p = sub.add_parser("features", help="FD feature spaces: list them, or run a sanity ladder on real images",
                       description="`features list`: the registered feature spaces. `features ladder`: FD of real images "
                       "against a reference under growing noise, blur, a colour shift and mode collapse (docs/shapes.md).")
    p.add_argument("action", choices=["list", "ladder"])
    p.add_argument("real_dir", nargs="?", metavar="REAL_DIR", help="ladder: folder of reference real images")
    p.add_argument("other_real_dir", nargs="?", metavar="OTHER_REAL_DIR", help="ladder: folder of other real images (disjoint)")
    p.add_argument("--feature", default="random-conv", help="registered feature space (stepdistill features list)")
    p.add_argument("--num-samples", type=int, default=2000, help="images of OTHER_REAL_DIR (the first N, sorted)")
    p.add_argument("--reference-samples", type=int, default=None,
                   help="images of REAL_DIR (default: --num-samples; all of a training folder gives the noise floor)")
    p.add_argument("--inception-weights", default=None, help="for --feature inception")
    p.add_argument("--seed", type=int, default=0, help="seed of the Gaussian noise")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=_cmd_features)


def _add_schema(sub) -> None:
    p = sub.add_parser("schema", help="print the JSON Schema of the recipe format (for editors that complete and check YAML)",
                       description="Print the JSON Schema (draft 2020-12) of distillation recipes (`stepdistill distill`) or "
                       "teacher recipes (`stepdistill train-teacher`): types, choices, numeric ranges, defaults, and no "
                       "unknown keys. E.g. `stepdistill schema > recipe.schema.json`, then point the editor's YAML "
                       "schema setting at it (or a `# yaml-language-server: $schema=recipe.schema.json` first line).")
    p.add_argument("--kind", choices=["distill", "teacher"], default="distill", help="which recipe format (default: distill)")
    p.set_defaults(func=_cmd_schema)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepdistill",
        description="Diffusion step distillation: few-step students from multi-step teachers, as diffusers pipelines.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for add in (_add_train_teacher, _add_distill, _add_hybrid, _add_plan, _add_curve, _add_train_classifier, _add_bench,
                _add_export, _add_sample, _add_eval, _add_data, _add_features, _add_schema):
        add(sub)  # one function per subcommand, above
    return parser


LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() breaks at


def one_line(message: object) -> str:
    """The message with line breaks escaped (a user-given key or path may hold one)."""
    return "".join(repr(c)[1:-1] if c in LINE_BREAKS else c for c in str(message))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TrainingInterrupted as exc:  # SIGTERM / Ctrl-C: checkpoint written, resumable
        print(f"stepdistill {args.command}: stopped: {one_line(exc)}", file=sys.stderr)
        return 128 + exc.signum
    except StepdistillError as exc:
        print(f"stepdistill {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stepdistill {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
