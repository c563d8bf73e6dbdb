"""Every command in docs/reproduce-paper.md runs, as printed, against hub-faithful
fixtures: ``hustvl/yolos-tiny`` and timm's ``vit_tiny_patch16_384.augreg_in21k_ft_in1k`` are
random-weight replicas in a local Hugging Face cache (the hub's configs, processor and file
layouts; tests/hub_fixtures.py), ``$COCO``/``$VOC`` generated datasets. Only what the
doc cannot mean on a 2-core CI box is changed, and each change is listed in SCALE: fewer
epochs, CPU instead of CUDA, one label worker, one timing repeat. A command that needs
CUDA in the doc (bf16) runs on CPU too (a bf16 detector; it crashed in timing before).

The mistakes this catches: a doc command whose option was renamed or whose defaults stop
fitting each other (label grid vs. train input, an option never passed such as
--detector-size derived from the config), a hub name that no longer resolves from a cache,
a threshold placeholder the doc forgot to explain."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from .cli_helpers import run_cli
from .hub_fixtures import TIMM_VIT, build_hub_yolos, build_timm_vit, install_in_hub_cache, use_hub_cache

DOC = Path(__file__).resolve().parents[1] / "docs" / "reproduce-paper.md"

# option → value the test runs with instead of the doc's (CI has 2 cores and no GPU)
SCALE = {"--epochs": "1", "--device": "cpu", "--workers": "1"}
# options added to a command (prune-eval's timing would time 14 rows x 3 repeats x 8 images)
APPEND = {"prune-eval": ["--timing-images", "1", "--timing-repeats", "1"]}


def doc_commands(text: str) -> list[list[str]]:
    """The ``bavit`` commands of the doc's bash blocks, in order: comments dropped, line
    continuations joined, ``for v in ...; do ... done`` loops unrolled, ``torchrun ... -m
    bavit_cli`` read as ``bavit``, and ``bavit X ... --opt v`` read as the previous ``bavit
    X`` command with those options replaced."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s+)#.*$", "", line).strip()
            if line:
                lines.append(line)
    cmds: list[list[str]] = []
    loop = None
    for line in lines:
        m = re.match(r"for (\w+) in ([^;]+); do$", line)
        if m:
            loop = (m.group(1), m.group(2).split(), [])
            continue
        if line == "done":
            var, values, body = loop
            for v in values:
                cmds += [[w.replace(f"${var}", v) for w in c] for c in body]
            loop = None
            continue
        if re.match(r"^[A-Z_]+=", line):  # a variable the reader sets ($COCO, $VOC)
            continue
        words = shlex.split(line)
        if words[0] == "torchrun":
            words = ["bavit"] + words[words.index("bavit_cli") + 1:]
        assert words[0] == "bavit", f"not a bavit command in {DOC.name}: {line}"
        if "..." in words:
            prev = next(c for c in reversed(cmds) if c[:2] == words[:2])
            words = override(prev, words[words.index("...") + 1:])
        (loop[2] if loop else cmds).append(words)
    return cmds


def override(cmd: list[str], opts: list[str]) -> list[str]:
    """``cmd`` with each ``--opt value`` pair of ``opts`` replacing its own (or appended)."""
    out = list(cmd)
    for k, v in zip(opts[::2], opts[1::2]):
        if k in out:
            out[out.index(k) + 1] = v
        else:
            out += [k, v]
    return out


def test_the_parser_reads_loops_continuations_and_elisions():
    text = ("```bash\nX=1\nbavit a --p 1 \\\n  --q 2   # comment\n# a line\nfor d in 2 10; do\n"
            "  torchrun --nproc_per_node 8 -m bavit_cli t --depth $d\ndone\nbavit a ... --q 3 --r 4\n```\n"
            "```text\nbavit not-bash\n```\n")
    assert doc_commands(text) == [["bavit", "a", "--p", "1", "--q", "2"], ["bavit", "t", "--depth", "2"],
                                  ["bavit", "t", "--depth", "10"], ["bavit", "a", "--p", "1", "--q", "3", "--r", "4"]]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A local HF cache holding hustvl/yolos-tiny (2 layers, width 48: its config, processor,
    label table and file layout otherwise) and timm's ViT-tiny (full size)."""
    root = tmp_path_factory.mktemp("doc_hub")
    cache = root / "cache"
    install_in_hub_cache(cache, "hustvl/yolos-tiny", build_hub_yolos("yolos-tiny", root / "yolos", layers=2, hidden=48))
    install_in_hub_cache(cache, f"timm/{TIMM_VIT}", build_timm_vit(root / "vit"))
    return cache


def test_every_command_of_reproduce_paper_runs_on_hub_faithful_fixtures(hub_cache, coco_named, voc_synth, tmp_path,
                                                                         monkeypatch):
    text = DOC.read_text()
    cmds = doc_commands(text)
    assert len(cmds) >= 12, cmds
    assert "T35" in text and "Read the threshold T35 off" in text  # the placeholder is explained
    use_hub_cache(monkeypatch, hub_cache)
    monkeypatch.chdir(tmp_path)
    subst = {"$COCO": str(coco_named), "$VOC": str(voc_synth), "T35": "0.5"}
    ran = []
    for cmd in cmds:
        args = [subst.get(w, w) for w in cmd[1:]]
        for k, v in SCALE.items():
            if k in args:
                args[args.index(k) + 1] = v
        args += APPEND.get(args[0], [])
        code, out, err = run_cli(*args)
        assert code == 0, (args, err)
        ran.append(args[0])
    assert sorted(set(ran)) == ["finetune", "label", "prune-eval", "report", "train"]

    # the two prune-eval protocols of the doc, named in their meta.json
    square = json.loads(Path("results/coco/meta.json").read_text())
    card = json.loads(Path("results/coco-card/meta.json").read_text())
    assert square["input_protocol"]["description"] == "square 512x512"
    assert square["detector_tokens"] == {"mean": 1024.0, "min": 1024, "max": 1024}
    assert card["input_protocol"]["description"] == "checkpoint (shortest edge 512, longest 1333)"
    # coco_synth's 160x120 images: shortest edge 512 → 512x682 → 32x42 tokens
    assert card["detector_tokens"] == {"mean": 1344.0, "min": 1344, "max": 1344}
    # the fine-tuned detector says the size it trained at, and prune-eval's default follows it
    f_proto = json.loads(Path("detectors/yolos-tiny-F/preprocessor_config.json").read_text())
    assert f_proto["size"] == {"height": 512, "width": 512}
    assert json.loads(Path("results/coco-F/meta.json").read_text())["input_protocol"]["description"] == \
        "square 512x512"
    assert Path("report/coco/index.html").is_file()
