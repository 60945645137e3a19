"""Patient-disjoint, deterministic lung-set splits (covidmt_jax.data.splits)."""
from __future__ import annotations

import collections

import numpy as np
import pytest
from PIL import Image

from covidmt_jax.data import splits as S
from covidmt_jax.data.records import DataError

IEEE = ("v7_covid_anatomical", "quex_covid_fields")


def test_group_split_is_a_pure_function_with_the_documented_fractions():
    groups = [f"g{i}" for i in range(20000)]
    first = [S.group_split(g) for g in groups]
    assert first == [S.group_split(g) for g in groups]
    frac = collections.Counter(first)
    for name, want in zip(S.SPLITS, S.FRACTIONS):
        assert abs(frac[name] / len(groups) - want) < 0.015, (name, frac)
    with pytest.raises(ValueError, match="fractions"):
        S.group_split("g", fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="split_group is required"):
        S.film_split("v7_covid_anatomical", "x")
    with pytest.raises(ValueError, match="unknown source"):
        S.film_split("nope", "x")


def _fake_folder(root, name, stems, groups=None):
    d = root / name
    (d / "images").mkdir(parents=True)
    for s in stems:
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(d / "images" / f"{s}.png")
    if groups is not None:
        with open(d / "pairs.csv", "w") as f:
            f.write("stem,status,split_group\n")
            f.writelines(f"{s},ok,{g}\n" for s, g in zip(stems, groups))
    return d


def test_splits_stable_when_films_are_added_and_groups_shared(tmp_path):
    stems = [f"q{i}" for i in range(60)]
    d = _fake_folder(tmp_path / "a", "quex_pneumonia_normal_fields", stems)
    before = S.folder_splits(d)
    d2 = _fake_folder(tmp_path / "b", "quex_pneumonia_normal_fields", stems + [f"new{i}" for i in range(40)])
    after = S.folder_splits(d2)
    assert all(after[s] == before[s] for s in stems)
    # two folders sharing patients: same group -> same split, whatever the stems
    groups = [f"ieeepid_{i // 3}" for i in range(60)]
    a = S.folder_splits(_fake_folder(tmp_path / "c", "v7_covid_anatomical", stems, groups))
    b = S.folder_splits(_fake_folder(tmp_path / "c", "quex_covid_fields", [s + "x" for s in stems], groups))
    assert all(a[s] == b[s + "x"] == S.group_split(g) for s, g in zip(stems, groups))
    with pytest.raises(DataError, match="no split rule"):
        S.folder_splits(_fake_folder(tmp_path / "d", "other_set", stems))


def test_real_sets_patient_disjoint_and_shared_patients_aligned(shared_data):
    folders = S.set_folders(shared_data)
    if set(folders) != set(S.SOURCES):
        pytest.skip(f"lung sets missing under {shared_data}: {sorted(set(S.SOURCES) - set(folders))}")
    side_of_group: dict[str, set] = collections.defaultdict(set)
    for name in IEEE:
        groups, splits = S.read_groups(folders[name]), S.folder_splits(folders[name])
        for stem, g in groups.items():
            side_of_group[g].add(splits[stem])
    assert side_of_group and all(len(v) == 1 for v in side_of_group.values())  # disjoint across both folders
    counts = S.split_counts(shared_data)
    for name, row in counts.items():
        assert min(row[s] for s in S.SPLITS) > 0, (name, row)
    # Montgomery/Shenzhen: one film per patient; val/test = the first U-Net's 106 held-out films
    mcsz = S.folder_splits(folders["lungs_mc_sz_512"])
    patients = collections.Counter(s.rsplit("_", 1)[0] for s in mcsz)
    assert max(patients.values()) == 1
    from covidmt_jax.data.records import holdout_split
    from covidmt_jax.data.sources.lungs import LungMaskSource
    src = LungMaskSource(folders["lungs_mc_sz_512"])
    keep, hold = holdout_split(src, 0.15, seed=0)
    assert {src.ids[i] for i in hold} == {s for s, sp in mcsz.items() if sp != "train"}
    assert counts["lungs_mc_sz_512"]["train"] == len(keep)
