"""README.md and docs/: every relative link resolves, every figure names the command that made it, and the cheap
figures agree with a fresh run of that command.

A figure is an image or a table with a bare number in a cell. In README.md and the hand-written docs/*.md pages the
line after each figure starts with "Made by:" and names its command(s) in backticks; a page in a docs/ subfolder
is a command's own output (docs/toy_ablation/README.md) and names that command once, before its first figure.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, accelerate_launch, run_in_process, run_script

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
NUMBER = re.compile(r"[-+]?[\d,]*\.?\d+ ?(%|x|s|dB|M|GiB)?")
SCRIPT = re.compile(r"(?:^|\s)((?:train|eval|data)/[\w/]+\.py)\b")


def prose(text: str) -> list[str]:
    """The page's lines with fenced code blocks blanked (links and tables in code are not the page's)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (backticks too), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose(page.read_text()):
        if m := re.match(r"#{1,6} (.+)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def figures(lines: list[str]) -> list[tuple[int, int]]:
    """(first line, last line) of each figure: an image on its own line, or a table with a bare number in a body
    cell."""
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("!["):
            found.append((i, i))
        elif lines[i].startswith("|"):
            end = i
            while end + 1 < len(lines) and lines[end + 1].startswith("|"):
                end += 1
            body = [cell.strip() for row in lines[i + 2:end + 1] for cell in row.strip("|").split("|")]
            if any(NUMBER.fullmatch(cell) for cell in body):
                found.append((i, end))
            i = end
        i += 1
    return found


def made_by_commands(line: str) -> list[str]:
    """The scripts a "Made by:" line names in backticks, or in the indented command lines after it."""
    return SCRIPT.findall(" ".join(re.findall(r"`([^`]+)`", line)))


def test_every_relative_link_in_readme_and_docs_resolves():
    for page in PAGES:
        for number, line in enumerate(prose(page.read_text()), 1):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue  # http(s), mailto: not checked offline
                path, _, anchor = target.partition("#")
                resolved = (page.parent / path).resolve() if path else page
                where = f"{page.relative_to(ROOT)}:{number}: {target}"
                assert resolved.exists(), where + " (no such file)"
                if anchor and resolved.suffix == ".md":
                    assert anchor in anchors(resolved), where + " (no such heading)"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"


def test_every_figure_names_an_existing_command_that_made_it():
    checked = 0
    for page in PAGES:
        lines = prose(page.read_text())
        found = figures(lines)
        generated = page.parent != ROOT / "docs" and page != ROOT / "README.md"
        for first, last in found:
            where = f"{page.relative_to(ROOT)}:{first + 1}"
            if generated:
                intro = page.read_text().splitlines()[:found[0][0]]
                at = next(i for i, line in enumerate(intro) if "Made by" in line)
                scripts = SCRIPT.findall(" ".join(line for line in intro[at:] if line.startswith("    ")))
            else:
                after = next((line for line in lines[last + 1:] if line.strip()), "")
                assert after.startswith("Made by:"), where + ": no 'Made by:' line after the figure"
                scripts = made_by_commands(after)
            assert scripts, where + ": its 'Made by' names no command"
            for script in scripts:
                assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
            checked += 1
    assert checked >= 12  # the figures of docs/ at the time of writing; fewer means the detection broke


def test_every_image_in_readme_and_docs_exists():
    images = [(page, target) for page in PAGES for line in prose(page.read_text())
              for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", line)]
    assert len(images) >= 3
    for page, target in images:
        assert (page.parent / target).is_file(), f"{page.relative_to(ROOT)}: {target}"


def test_figure_detection_tells_numbers_from_settings():
    lines = ["| Key | What |", "|---|---|", "| `gan.weight` | λ (0: off) |", "",
             "| model | PSNR dB |", "|---|---|", "| student | 14.41 |", "", "![grid](grid.png)"]
    assert figures(lines) == [(4, 6), (8, 8)]
    assert made_by_commands("Made by: `accelerate launch train/kd.py --config c.yaml`, then "
                            "`python eval/evaluate.py runs/toy` (its report).") == ["train/kd.py", "eval/evaluate.py"]


# --- the cheap figures, against a fresh run of their commands ---------------------------------------------------

def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table(page: str, header: str) -> list[list[str]]:
    """The rows (cells stripped; the header row first, no separator) of the table in docs/`page` whose header
    line starts with `header`."""
    lines = (ROOT / "docs" / page).read_text().splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.startswith(header)]
    rows = [cells(lines[start])]
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def preset(cell: str) -> str:
    """`bk_base` (one resnet per level) -> bk_base; teacher -> teacher."""
    return re.match(r"`?(\w+)`?", cell).group(1)


def show_student(teacher: Path, name: str, capsys) -> dict:
    capsys.readouterr()
    assert run_in_process("train/show_student.py", ["--teacher", str(teacher), "--preset", name, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_student_parameter_tables_match_show_student(tmp_path, capsys):
    """docs/training.md's U-Net parameter counts are show_student's, exactly (they do not vary between runs)."""
    from sdkd.train.models.sd_configs import SD15_UNET, SD21_BASE_UNET, SDXL_UNET

    folders = {}
    for name, config in (("sd15", SD15_UNET), ("sd21", SD21_BASE_UNET), ("sdxl", SDXL_UNET)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "config.json").write_text(json.dumps(config))
    sd_rows = table("training.md", "| Preset | SD-1.5 U-Net params")[1:]
    xl_rows = table("training.md", "| SDXL preset | SDXL-base U-Net params")[1:]
    assert len(sd_rows) == 5 and len(xl_rows) == 5
    for rows, columns in ((sd_rows, ("sd15", "sd21")), (xl_rows, ("sdxl",))):
        students = [preset(row[0]) for row in rows if preset(row[0]) != "teacher"]
        reports = {c: {s: show_student(folders[c], s, capsys) for s in students} for c in columns}
        for row in rows:
            for column, cell in zip(columns, row[1:]):
                name = preset(row[0])
                report = reports[column][students[0] if name == "teacher" else name]
                got = report["teacher_params" if name == "teacher" else "student_params"]
                assert number(cell) == got, f"{name} on {column}: docs/training.md says {cell}, show_student {got:,}"


# docs/evaluation.md's toy table: column -> (report.json key, how a fresh value is compared). Parameters, MACs, steps
# and guidance do not vary; the agreement figures move with float summation order across machines, and a colour
# column by one image of 16 at most; the seconds are the machine's and are not compared.
EVALUATION_COLUMNS = {
    "step": ("step", lambda cell, got: int(cell) == got),
    "U-Net params": ("unet_params", lambda cell, got: number(cell) == got),
    "U-Net GMACs": ("unet_macs", lambda cell, got: number(cell) == round(got / 1e9, 3)),
    "noise MSE": ("noise_mse", lambda cell, got: number(cell) == pytest.approx(got, rel=0.05, abs=1e-9)),
    "sample MSE": ("sample_mse", lambda cell, got: number(cell) == pytest.approx(got, rel=0.05)),
    "PSNR dB": ("sample_psnr", lambda cell, got: number(cell) == pytest.approx(got, abs=0.3)),
    "fg colour": ("fg_colour", lambda cell, got: number(cell.rstrip("%")) / 100 == pytest.approx(got, abs=0.07)),
    "bg colour": ("bg_colour", lambda cell, got: number(cell.rstrip("%")) / 100 == pytest.approx(got, abs=0.07)),
    "steps": ("steps", lambda cell, got: number(cell) == got),
    "guidance": ("guidance_scale", lambda cell, got: number(cell) == got),
}


@pytest.mark.e2e
def test_first_run_distils_and_its_figures_match_a_fresh_run(tmp_path):
    """The README's first run and eval/evaluate.py on it: on the held-out captions the last checkpoint draws at
    least 80% of the teacher's foreground-colour hits and its sample PSNR against the teacher is above the first
    checkpoint's; docs/evaluation.md's table agrees with the fresh report row by row and column by column
    (EVALUATION_COLUMNS says how each is compared); the README's grid (docs/first_run.png) and the run's last
    grid have one size and differ by less than 4 of 255 per pixel on average."""
    run = tmp_path / "toy"
    # a few minutes on 2 idle cores, many more on a crowded machine
    r = accelerate_launch(["train/kd.py", "--config", "configs/toy.yaml", f"output_dir={run}"], timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    r = run_script([sys.executable, "eval/evaluate.py", str(run), "--config", "configs/eval_toy.yaml"], timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    fresh = {row["name"]: row for row in json.loads((run / "eval" / "report.json").read_text())["rows"]}
    teacher, first, *_, last = fresh.values()
    assert last["fg_colour"] >= 0.8 * teacher["fg_colour"], (last["fg_colour"], teacher["fg_colour"])
    assert last["sample_psnr"] > first["sample_psnr"], (first["sample_psnr"], last["sample_psnr"])
    grids = sorted((run / "samples").glob("step-*.png"), key=lambda p: int(p.stem[5:]))
    fresh_grid = np.asarray(Image.open(grids[-1]).convert("RGB"), dtype=float)
    committed = np.asarray(Image.open(ROOT / "docs" / "first_run.png").convert("RGB"), dtype=float)
    assert fresh_grid.shape == committed.shape and np.abs(fresh_grid - committed).mean() < 4
    header, *committed = table("evaluation.md", "| model | step | U-Net params")
    assert [row[0] for row in committed] == list(fresh)
    assert set(header) - set(EVALUATION_COLUMNS) == {"model", "s/image", "U-Net s/image"}
    for row in committed:
        got = fresh[row[0]]
        for column, cell in zip(header, row):
            if column in EVALUATION_COLUMNS and cell:  # empty: the teacher against itself
                key, agrees = EVALUATION_COLUMNS[column]
                assert agrees(cell, got[key]), f"{row[0]}, {column}: docs/evaluation.md says {cell}, the run {got[key]}"


@pytest.mark.e2e
def test_toy_decoder_table_matches_a_fresh_run(tmp_path):
    """docs/tiny_decoder.md's toy table against the `eval/psnr` and `eval/ssim` of a fresh toy decoder run: within
    0.5 dB and 0.02 at every evaluated step (runs on one machine differ by up to 0.2 dB and 0.003 mid-run)."""
    # 200 steps: a minute on 2 idle cores, ten on a crowded machine
    r = accelerate_launch(["train/tiny_decoder.py", "--config", "configs/toy_decoder.yaml",
                           f"output_dir={tmp_path / 'run'}"], timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    fresh = {}
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/psnr" in row:
            fresh[row["step"]] = row
    header, psnr, ssim = table("tiny_decoder.md", "| step | 0 | 25")
    steps = [int(step) for step in header[1:]]
    assert steps == sorted(fresh) and psnr[0].startswith("`eval/psnr`") and ssim[0].startswith("`eval/ssim`")
    for step, db, s in zip(steps, psnr[1:], ssim[1:]):
        assert number(db) == pytest.approx(fresh[step]["eval/psnr"], abs=0.5), f"eval/psnr at step {step}"
        assert number(s) == pytest.approx(fresh[step]["eval/ssim"], abs=0.02), f"eval/ssim at step {step}"
