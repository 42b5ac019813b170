"""README.md stays true: its config block equals the code's defaults, and every command in it runs.

`python tests/test_readme.py --write` regenerates the "## Config format" block from
metassl/config.py's defaults (without `--write` it prints the block).
"""
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml

from metassl import config
from metassl.errors import ConfigError
from metassl.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# --- the config block ---------------------------------------------------------------------

# Comments the README puts beside keys (what the defaults alone do not say).
COMMENTS = {
    "name": "default run directory <storage>/<name>",
    "seed": "model init and the training episode stream",
    "storage": "where run directories live: runs/ by default, or s3://bucket/prefix, gs://...",
    "tune": "metassl tune only",
}
WIDTH = 100  # wrap flow mappings before this column
COMMENT_COLUMN = 29


def _scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict) and not value:
        return "{}"
    if isinstance(value, str) and yaml.safe_load(value) == value and value.strip() == value and ": " not in value:
        return value
    return json.dumps(value)  # a quoted YAML string


def _flow(mapping: dict, column: int) -> list[str]:
    """Lines of `{k: v, ...}` whose brace is at `column` (the first line without its indent).

    Lines wrap before WIDTH, continuing one column past the brace; a nested mapping that
    does not fit where it starts wraps inside its own braces.
    """
    indent = " " * (column + 1)
    lines, line = [], " " * column + "{"
    items = list(mapping.items())
    for i, (key, value) in enumerate(items):
        end = "}" if i == len(items) - 1 else ","
        sep = "" if line.endswith("{") or not line.strip() else " "
        item = f"{key}: {_scalar(value)}{end}"
        if isinstance(value, dict) and value:
            item = f"{key}: {{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items()) + "}" + end
        if len(line + sep + item) <= WIDTH:
            line += sep + item
        elif not (isinstance(value, dict) and value):
            lines.append(line)
            line = indent + item
        else:  # a nested mapping: on a line of its own, wrapped inside its braces
            if line.strip() and not line.endswith("{"):
                lines.append(line)
                line, sep = indent, ""
            head = line + sep + f"{key}: "
            inner = _flow(value, len(head))
            if len(inner) == 1:
                line = head + inner[0] + end
            else:
                lines.append(head + inner[0])
                lines.extend(inner[1:-1])
                line = inner[-1] + end
    lines.append(line)
    lines[0] = lines[0][column:]
    return lines


def defaults_block() -> str:
    """metassl/config.py's defaults in the README's format: scalars, then one flow mapping per section."""
    lines = []
    for key, value in config.to_dict(config.Config()).items():
        if isinstance(value, dict) and value:
            head = f"{key}:".ljust(9) + " "
            body = _flow(value, len(head))
            entry = [head + body[0], *body[1:]]
        else:
            entry = [f"{key}: {_scalar(value)}"]
        if key in COMMENTS:
            last = entry[-1]
            entry[-1] = f"{last.ljust(COMMENT_COLUMN) if len(last) < COMMENT_COLUMN else last + '  '}# {COMMENTS[key]}"
        lines.extend(entry)
    return "\n".join(lines) + "\n"


_BLOCK = re.compile(r"(\n## Config format\n(?:(?!\n## ).)*?```yaml\n)(.*?)(```)", re.S)


def readme_config_block(text: str) -> str:
    match = _BLOCK.search(text)
    assert match, "README.md has no ```yaml block under '## Config format'"
    return match.group(2)


def test_defaults_block_is_valid_yaml_of_the_defaults():
    assert yaml.safe_load(defaults_block()) == config.to_dict(config.Config())
    assert set(COMMENTS) <= set(config.to_dict(config.Config()))
    assert max(len(line) for line in defaults_block().splitlines()) <= WIDTH + 40  # comments may run past


def test_readme_config_block_equals_the_defaults():
    assert readme_config_block(README.read_text()) == defaults_block(), (
        "README.md's '## Config format' block differs from metassl/config.py's defaults; "
        "regenerate it with: python tests/test_readme.py --write")


# --- commands ----------------------------------------------------------------------------

PROGRAMS = ("metassl", "make", "python", "python3", "ray", "pip", "kubectl", "docker", "tensorboard", "bash")
SMALL_TRAIN = ["--set", "model.hidden=8", "--set", "train.steps=2", "--set", "train.log_every=1",
               "--set", "train.val_every=2", "--set", "train.val_episodes=4", "--set", "train.checkpoint_every=2",
               "--set", "eval.episodes=4", "--set", "episodes.meta_batch=2", "--set", "train.threads=1"]

# How each command line in README.md's fenced blocks is exercised:
#   ("run", args): run here through metassl.cli.main, in a temporary folder that links experiments/, with
#                  `args` appended ("{tmp}" is that folder); `metassl eval runs/NAME` first trains
#                  experiments/NAME.yaml there with SMALL_TRAIN.
#   ("parse", None): parsed by metassl.cli.build_parser and its config loaded (every metassl command is).
#   ("covered", "tests/FILE.py::TEST" or a tuple of them): by those tests.
#   ("ci", "FILE"): by the CI script FILE, which contains the command.
COMMANDS = {
    "make run": ("covered", ("tests/test_readme.py::test_make_run_recipe_is_a_valid_command",  # the recipe
                             # its experiment, at a tiny size, in a fresh process
                             "tests/test_quickstart.py::test_quickstart_runs_actors_and_the_combined_objective_"
                             "and_prints_both_networks")),
    "make test": ("ci", ".ci/run"),
    "metassl train experiments/omniglot_maml.yaml --set data.root=/data/omniglot --set learner.inner_lr=0.2":
        ("run", [*SMALL_TRAIN, "--set", "data.root=null", "--run-dir", "{tmp}/run"]),  # on Ray, 2 workers
    "metassl generate experiments/omniglot_umtra_protonet.yaml --out /data/episodes/umtra --episodes 20000 "
    "--set data.root=/data/omniglot --set generator.actors=2":
        ("run", ["--out", "{tmp}/episodes", "--episodes", "4", "--episodes-per-shard", "2",
                 "--set", "data.root=null", "--set", "generator.actors=0"]),
    "metassl eval runs/omniglot_protonet --n-way 20 --k-shot 5 --json": ("run", ["--episodes", "2"]),
    "metassl eval runs/omniglot_protonet --shapes 5w1s,5w5s,20w1s5q,20w5s5q --episodes 1000": ("run", ["--episodes", "2"]),
    "metassl fit-generative experiments/omniglot_lasium_protonet.yaml --run-dir runs/omniglot_vae":
        ("run", ["--backend", "local", "--set", "generator.generative.steps=2", "--set", "generator.generative.hidden=8",
                 "--set", "train.threads=1"]),  # on Ray: tests/test_generative.py
    "metassl train experiments/omniglot_lasium_protonet.yaml --workers 1 --set generator.generative.checkpoint=runs/omniglot_vae":
        ("covered", "tests/test_generative.py::test_train_fits_the_generative_model_once_or_uses_the_one_named"),
    # two runs and --out, on make run's experiment at a tiny size
    "metassl report runs/omniglot_umtra_protonet runs/omniglot_cactus_protonet --out runs/umtra_vs_cactus.png":
        ("covered", "tests/test_quickstart.py::test_quickstart_runs_actors_and_the_combined_objective_"
                    "and_prints_both_networks"),
}


def readme_commands(text: str) -> list[str]:
    """Command lines of the fenced blocks of `text` (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            if line.split()[:1] and line.split()[0] in PROGRAMS:
                commands.append(" ".join(shlex.split(line, comments=True)))
    return commands


def test_every_readme_command_is_in_the_table():
    found = readme_commands(README.read_text())
    new = [c for c in found if c not in COMMANDS]
    assert not new, f"README.md has commands that no test exercises; add each to COMMANDS in {__file__}: {new}"
    stale = [c for c in COMMANDS if c not in found]
    assert not stale, f"COMMANDS in {__file__} lists commands README.md no longer has: {stale}"


def _short(command: str) -> str:
    return " ".join(command.split()[:3])


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("metassl ")], ids=_short)
def test_readme_metassl_commands_parse_and_their_configs_load(command):
    args = build_parser().parse_args(shlex.split(command)[1:])
    if getattr(args, "config", None) is not None:
        config.load(REPO / args.config, args.set)


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) of every `metassl train | fit-generative` command a user is shown: README.md's
    blocks and the usage lines at the top of each experiments/*.yaml."""
    found = [("README.md", c) for c in readme_commands(README.read_text())]
    for path in sorted((REPO / "experiments").glob("*.yaml")):
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break  # the usage lines are in the header comment
            text = line.lstrip("# ").strip()
            if text.startswith("metassl "):
                found.append((path.name, " ".join(shlex.split(text.replace("[", " ").replace("]", " ")))))
    return [(where, c) for where, c in found if c.split()[1] in ("train", "fit-generative")]


def test_documented_commands_split_their_batches_over_their_workers():
    """A documented command must not fail at once with "meta_batch=1 must be a multiple of
    --workers=2": a config whose (meta-)batch is odd names `--workers 1` in its usage line."""
    from metassl.raytrain import check_worker_share

    commands = documented_commands()
    assert any(where.endswith(".yaml") for where, _ in commands) and any(w == "README.md" for w, _ in commands)
    wrong = []
    for where, command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        if getattr(args, "backend", "ray") != "ray":
            continue
        cfg = config.load(REPO / args.config if args.config else None, args.set)
        try:
            check_worker_share(cfg, args.workers, fit=args.command == "fit-generative")
        except ConfigError as err:
            wrong.append(f"{where}: {command}: {err}")
    assert not wrong, "\n".join(wrong)


def test_covered_and_ci_commands_name_what_runs_them():
    for command, (how, where) in COMMANDS.items():
        if how == "covered":
            for test in (where,) if isinstance(where, str) else where:
                path, _, name = test.partition("::")
                assert re.search(rf"^def {re.escape(name)}\(", (REPO / path).read_text(), re.M), \
                    f"{command!r}: {test} does not exist"
        elif how == "ci":
            assert command in (REPO / where).read_text(), f"{command!r}: {where} does not run it"
        else:
            assert how in ("run", "parse"), f"{command!r}: unknown way {how!r}"


def test_make_run_recipe_is_a_valid_command():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "the Makefile has no run target"
    lines = [line.strip() for line in recipe.group(1).splitlines() if "bin/metassl " in line]
    assert lines, "`make run` no longer runs metassl"
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])
        config.load(REPO / args.config, args.set)


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is fastest and spares a busy machine from oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("ray_session", "one_thread")
@pytest.mark.parametrize("command", [c for c, (how, _) in COMMANDS.items() if how == "run"], ids=_short)
def test_readme_command_runs_at_a_small_size(command, short_tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(short_tmp_path)
    (short_tmp_path / "experiments").symlink_to(REPO / "experiments")
    args = shlex.split(command)[1:] + [a.replace("{tmp}", str(short_tmp_path)) for a in COMMANDS[command][1]]
    if args[0] == "eval" and args[1].startswith("runs/"):
        name = args[1].split("/")[1]
        assert main(["train", f"experiments/{name}.yaml", "--backend", "local", "--run-dir", args[1],
                     *SMALL_TRAIN]) == 0
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    if args[0] == "eval" and "--shapes" in args:  # one line per shape, in order
        lines = out.strip().splitlines()[-4:]
        assert [line.split(": accuracy")[0].split()[-2:] for line in lines] == \
            [["5-way", "1-shot"], ["5-way", "5-shot"], ["20-way", "1-shot"], ["20-way", "5-shot"]], out
    elif args[0] == "eval":
        assert json.loads(out.strip().splitlines()[-1])["protocol"]["n_way"] == 20
    if args[0] == "train":
        assert json.loads((short_tmp_path / "run" / "result.json").read_text())["steps"] == 2
    if args[0] == "fit-generative":
        assert json.loads((short_tmp_path / "runs" / "omniglot_vae" / "result.json").read_text())["steps"] == 2
    if args[0] == "generate":
        assert json.loads((short_tmp_path / "episodes" / "manifest.json").read_text())


if __name__ == "__main__":
    block = defaults_block()
    if sys.argv[1:] == ["--write"]:
        text = README.read_text()
        readme_config_block(text)
        README.write_text(_BLOCK.sub(lambda m: m.group(1) + block + m.group(3), text, count=1))
        print(f"rewrote the config block of {README}")
    else:
        print(block, end="")
