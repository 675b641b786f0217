"""Bad input to every command ends as one clear line and exit 2, never a traceback;
interrupts say how to resume; TensorFlow's start-up noise stays off the console."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from skinlesion import cli, logs
from skinlesion.errors import EXIT_BAD_INPUT, EXIT_CTRL_C, EXIT_INTERRUPTED
from skinlesion.ham10000 import METADATA
from skinlesion.storage import FileStore, open_store

STAGES_WITH_CONFIG = ("prepare", "augment", "train", "evaluate", "promote")
COMMANDS = (*STAGES_WITH_CONFIG, "predict", "sample-data", "run", "cancel", "gc")
# `runs list|show` and `models ...` have their own bad-input tests
# (tests/test_run_status.py, tests/test_models_cli.py).


@dataclass(frozen=True)
class Paths:
    tmp: Path
    missing: Path  # a store that does not exist yet
    a_file: Path  # an existing plain file
    binary: Path  # an existing binary file (a PNG header)
    bad_yaml: Path


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    (tmp_path / "a-file").write_text("x\n")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfd")
    (tmp_path / "bad.yaml").write_text("train: [\n")
    return Paths(
        tmp_path,
        tmp_path / "nothing",
        tmp_path / "a-file",
        tmp_path / "picture.png",
        tmp_path / "bad.yaml",
    )


def base_args(command: str, p: Paths) -> list[str]:
    """A well-formed command line (its stores need not exist: every case fails first)."""
    m = str(p.missing)
    return {
        "prepare": ["prepare", "--raw", m, "--out", f"{m}/out"],
        "augment": ["augment", "--prepared", m, "--out", f"{m}/out"],
        "train": ["train", "--train-data", m, "--val-data", m, "--out", f"{m}/out"],
        "evaluate": ["evaluate", "--model", m, "--val-data", m, "--out", f"{m}/out"],
        "promote": ["promote", "--candidate", m, "--model", m, "--target", m, "--out", f"{m}/o"],
        "predict": ["predict", "--model", m, str(p.binary)],
        "sample-data": ["sample-data", "--out", m, "--images", "70"],
        "run": ["run", "--store", m, "--preset", "tiny", "--run-id", "x"],
        "cancel": ["cancel", "--store", m, "--run-id", "x"],
        "gc": ["gc", "--store", m, "--keep-last", "2"],
    }[command]


def replace(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2 :]]


def drop(args: list[str], flag: str) -> list[str]:
    i = args.index(flag)
    return [*args[:i], *args[i + 2 :]]


# (case id, commands it applies to, argv from the base argv, text the error line names)
Case = tuple[str, tuple[str, ...], Callable[[list[str], Paths], list[str]], Callable[[Paths], str]]
CONFIG_TAKERS = (*STAGES_WITH_CONFIG, "run")
OUT_TAKERS = (*STAGES_WITH_CONFIG, "sample-data")
CASES: list[Case] = [
    (
        "missing-config",
        CONFIG_TAKERS,
        lambda a, p: [*a, "--config", str(p.tmp / "no.yaml")],
        lambda p: f"--config {p.tmp / 'no.yaml'}: no such file",
    ),
    (
        "directory-config",
        CONFIG_TAKERS,
        lambda a, p: [*a, "--config", str(p.tmp)],
        lambda p: f"--config {p.tmp}: is a directory",
    ),
    (
        "binary-config",
        CONFIG_TAKERS,
        lambda a, p: [*a, "--config", str(p.binary)],
        lambda p: f"--config {p.binary}: not UTF-8 text",
    ),
    (
        "bad-yaml-config",
        CONFIG_TAKERS,
        lambda a, p: [*a, "--config", str(p.bad_yaml)],
        lambda p: f"--config {p.bad_yaml}: invalid YAML",
    ),
    (
        "out-is-a-file",
        OUT_TAKERS,
        lambda a, p: replace(a, "--out", str(p.a_file)),
        lambda p: f"--out: {p.a_file} is a file, not a directory",
    ),
    (
        "store-is-a-file",
        ("run",),
        lambda a, p: replace(a, "--store", str(p.a_file)),
        lambda p: f"--store: {p.a_file} is a file",
    ),
    (
        "bad-uri-scheme",
        COMMANDS,
        lambda a, p: replace(a, a[1], "ftp://host/x"),  # the first store flag
        lambda p: "unsupported store URI scheme 'ftp'",
    ),
    (
        "file-uri-with-fragment",
        OUT_TAKERS,
        lambda a, p: replace(a, "--out", f"file://{p.tmp}/a#b"),
        lambda p: "--out: file URI",
    ),
    (
        "negative-seed",
        ("prepare", "augment", "train", "sample-data"),
        lambda a, p: [*a, "--seed", "-1"],
        lambda p: "seed",
    ),
    (
        "seed-too-large",
        ("prepare", "augment", "train", "sample-data"),
        lambda a, p: [*a, "--seed", str(2**32)],
        lambda p: "seed",
    ),
    ("negative-seed-set", ("run",), lambda a, p: [*a, "--set", "train.seed=-1"], lambda p: "seed"),
    (
        "bad-set-yaml",
        ("run",),
        lambda a, p: [*a, "--set", "train.batch_size=[1"],
        lambda p: "--set train.batch_size=[1: invalid YAML",
    ),
    (
        "set-unknown-field",
        ("run",),
        lambda a, p: [*a, "--set", "train.batch=1"],
        lambda p: "train.batch",
    ),
    ("unknown-preset", ("run",), lambda a, p: replace(a, "--preset", "huge"), lambda p: "--preset"),
    (
        "bad-run-id",
        ("run", "cancel"),
        lambda a, p: replace(a, "--run-id", "Bad_Id"),
        lambda p: "run id",
    ),
    ("cancel-unknown-run", ("cancel",), lambda a, p: a, lambda p: "no run 'x' in"),
    (
        "bad-field-value",
        STAGES_WITH_CONFIG,
        lambda a, p: [
            *a,
            {
                "prepare": "--image-size",
                "augment": "--shard-size",
                "train": "--batch-size",
                "evaluate": "--ece-bins",
                "promote": "--min-improvement",
            }[a[0]],
            "lots",
        ],
        lambda p: "must be",
    ),
    (
        "missing-required-flag",
        (*STAGES_WITH_CONFIG, "predict", "sample-data"),
        lambda a, p: drop(a, a[1]),
        lambda p: "the following arguments are required",
    ),
    (
        "prepare-without-out",
        ("prepare",),
        lambda a, p: drop(a, "--out"),
        lambda p: "--out is required unless --dry-run",
    ),
    (
        "finetune-without-init-model",
        ("train",),
        lambda a, p: [*a, "--phase", "finetune"],
        lambda p: "--phase finetune needs --init-model",
    ),
    (
        "unknown-flag",
        COMMANDS,
        lambda a, p: [*a, "--frobnicate"],
        lambda p: "unrecognized arguments: --frobnicate",
    ),
    ("predict-without-model", ("predict",), lambda a, p: a, lambda p: "no model at"),
    (
        "sample-data-too-few",
        ("sample-data",),
        lambda a, p: replace(a, "--images", "3"),
        lambda p: "70",
    ),
]
TABLE = [
    pytest.param(command, build, names, id=f"{command}-{case}")
    for case, commands, build, names in CASES
    for command in commands
]


def assert_one_clear_error(command: str, code: int, stderr: str, names: str) -> None:
    lines = [x for x in stderr.splitlines() if x.startswith(f"skinlesion {command}: error:")]
    assert code == EXIT_BAD_INPUT, stderr
    assert len(lines) == 1, stderr
    assert names in lines[0], lines[0]
    assert "Traceback" not in stderr and " object at 0x" not in stderr, stderr


@pytest.mark.parametrize(("command", "build", "names"), TABLE)
def test_bad_input_is_one_line_and_exit_2(
    command: str,
    build: Callable[[list[str], Paths], list[str]],
    names: Callable[[Paths], str],
    paths: Paths,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = build(base_args(command, paths), paths)
    code = cli.main(argv)
    assert_one_clear_error(command, code, capsys.readouterr().err, names(paths))
    assert not paths.missing.exists()  # nothing half-written


def test_every_command_is_in_the_table() -> None:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    own_tests = {"controller", "runs", "models", "serve"}  # serve: tests/test_serving.py
    assert set(sub.choices) - own_tests == set(COMMANDS)  # type: ignore[arg-type]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != logs.TF_LOG_LEVEL}  # as a user has it
    return {**env, **extra}


def _cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "skinlesion", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["run", "--set", "train.batch_size=[1"], "--set train.batch_size=[1: invalid YAML"),
        (["sample-data", "--out", "{tmp}/s", "--seed", "-1"], "argument --seed: must be in [0, "),
        (
            ["train", "--train-data", "x", "--val-data", "x", "--out", "x", "--config", "{tmp}"],
            "is a directory",
        ),
    ],
    ids=["run-bad-set", "sample-data-negative-seed", "train-directory-config"],
)
def test_bad_input_in_a_subprocess(argv: list[str], names: str, tmp_path: Path) -> None:
    done = _cli(*(a.format(tmp=tmp_path) for a in argv), "--run-id", "x")
    assert_one_clear_error(argv[0], done.returncode, done.stderr, names.format(tmp=tmp_path))
    assert done.stdout == ""


# --- bad data files: the error names the file's full path ------------------------------


def _tree(tmp_path: Path, metadata: bytes) -> FileStore:
    store = FileStore(tmp_path / "raw tree")
    store.put_bytes(METADATA, metadata)
    return store


@pytest.mark.parametrize(
    ("metadata", "names"),
    [
        (
            b"lesion_id;image_id;dx;dx_type;age;sex;localization\nHAM_1;ISIC_1;nv;histo;40;m;back\n",
            "the delimiter looks wrong: columns are separated by ';'",
        ),
        (
            b"lesion_id\timage_id\tdx\tdx_type\tage\tsex\tlocalization\nHAM_1\tISIC_1\tnv\n",
            "the delimiter looks wrong: columns are separated by tab",
        ),
        (
            b"lesion_id,image_id,dx\n\xff\xfe\x00garbage\n",
            "{uri}/HAM10000_metadata.csv line 2: not UTF-8",
        ),
    ],
    ids=["semicolon", "tab", "not-utf8"],
)
def test_bad_metadata_names_the_problem(
    metadata: bytes, names: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = _tree(tmp_path, metadata)
    code = cli.main(["prepare", "--raw", tree.uri, "--dry-run"])
    assert_one_clear_error("prepare", code, capsys.readouterr().err, names.format(uri=tree.uri))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[FileStore, str]:
    """A tiny prepared set from synthetic data with one image that is no image (skipped)."""
    tmp = tmp_path_factory.mktemp("prepared")
    raw = FileStore(tmp / "raw")
    assert _cli("sample-data", "--out", raw.uri, "--images", "70").returncode == 0
    metadata = raw.get_bytes(METADATA).decode().splitlines()
    image_id = next(line.split(",")[1] for line in metadata if ",nv," in line)
    key = next(o.key for o in raw.list() if o.key.endswith(f"/{image_id}.jpg"))
    raw.put_bytes(key, b"this is not an image")
    out = FileStore(tmp / "prepared")
    done = _cli(
        "prepare",
        "--raw",
        raw.uri,
        "--out",
        out.uri,
        "--on-bad-image",
        "skip",
        "--image-size",
        "32",
        "--workers",
        "1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, f"{raw.uri}/{key}"


@pytest.mark.slow
def test_skipped_image_reason_names_the_file_and_no_address(
    prepared: tuple[FileStore, str],
) -> None:
    out, image_uri = prepared
    manifest = json.loads(out.get_bytes("manifest.json"))
    [skipped] = manifest["skipped"]
    assert skipped["reason"].startswith(f"{image_uri}: cannot decode image: ")
    assert "0x" not in skipped["reason"] and "object at" not in skipped["reason"]


@pytest.mark.slow
def test_tensorflow_start_up_noise_is_quiet_by_default(
    prepared: tuple[FileStore, str], tmp_path: Path
) -> None:
    out, _ = prepared
    done = _cli(
        "train",
        "--train-data",
        out.uri,
        "--val-data",
        out.uri,
        "--out",
        str(tmp_path / "t"),
        "--backbone",
        "mobilenetv3small",
        "--weights",
        "none",
        "--top-epochs",
        "1",
        "--batch-size",
        "16",
        "--dense-units",
        "8",
        "--run-id",
        "x",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert open_store(str(tmp_path / "t")).exists("manifest.json")
    for noise in ("cuInit", "cuda drivers", "absl::InitializeLog", "oneDNN"):
        assert noise not in done.stderr, done.stderr[-3000:]


def test_native_log_lines_follow_the_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(logs.TF_LOG_LEVEL, raising=False)
    logs.quiet_tensorflow(debug=True)
    assert os.environ[logs.TF_LOG_LEVEL] == "0"  # --log-level DEBUG: everything comes back
    monkeypatch.delenv(logs.TF_LOG_LEVEL)
    logs.quiet_tensorflow(debug=False)
    assert os.environ[logs.TF_LOG_LEVEL] == "3"
    monkeypatch.setenv(logs.TF_LOG_LEVEL, "1")
    logs.quiet_tensorflow(debug=False)
    assert os.environ[logs.TF_LOG_LEVEL] == "1"  # what the user set is kept
    info = b"I0000 00:00:1.2 5648 cudart_stub.cc:31] Could not find cuda drivers\n"
    error = b"E0000 00:00:1.2 5648 cuda_platform.cc:52] failed call to cuInit\n"
    other = b"a line of our own\n"
    assert logs.native_lines_kept([info, error, other], 1) == [error, other]
    assert logs.native_lines_kept([info, error, other], 3) == [other]
    assert logs.native_lines_kept([info, error, other], 0) == [info, error, other]


# --- interrupts ---------------------------------------------------------------------------


def _start_run(store: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "skinlesion", "run", "--preset", "tiny"]
    cmd += ["--store", str(store), "--run-id", "x"]
    return subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=_env(),
        start_new_session=True,
        # As from a terminal: a shell's background job (`cmd &` in a script, as CI may run us)
        # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(proc: subprocess.Popen[str], text: str) -> str:
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + 300
    while text not in seen:
        line = proc.stderr.readline()
        assert line, f"ended before {text!r}: {seen[-2000:]}"
        assert time.monotonic() < deadline
        seen += line
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(
    ("send", "code", "how"),
    [
        (lambda p: os.killpg(p.pid, signal.SIGINT), EXIT_CTRL_C, "Ctrl-C"),  # the terminal's group
        (lambda p: p.send_signal(signal.SIGTERM), EXIT_INTERRUPTED, "SIGTERM"),
    ],
    ids=["ctrl-c", "sigterm"],
)
def test_interrupt_says_state_is_saved_and_how_to_resume(
    send: Callable[[subprocess.Popen[str]], None], code: int, how: str, tmp_path: Path
) -> None:
    proc = _start_run(tmp_path / "store")
    try:
        seen = _wait_for(proc, '"stage_start"')
        send(proc)
        rest = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = seen + rest
    assert proc.returncode == code, stderr[-3000:]
    assert f"skinlesion run: interrupted ({how}): " in stderr
    assert "rerun the same command (same --run-id) to resume" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
