import pytest

from cifarlab.config import (
    TrainConfig,
    apply_overrides,
    list_recipes,
    load_recipe,
    parse_set_options,
    save_config,
)
from cifarlab.errors import UserError


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(UserError, match="did you mean 'label_smoothing'"):
        apply_overrides(TrainConfig(), {"label_smothing": 0.1}, where="x")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr", -0.1, "'lr' must be > 0"),
        ("batch_size", 0, "'batch_size' must be >= 1"),
        ("epochs", "ten", "'epochs' must be int"),
        ("flip", "maybe", "'flip' must be bool"),
        ("loader", "fast", "'loader' must be one of device, torchvision"),
        ("label_smoothing", 1.5, "'label_smoothing' must be <= 1"),
        ("batch_size", 1.5, "'batch_size' must be int"),
        ("lr", float("nan"), "'lr' must be float"),
        ("weight_decay", "inf", "'weight_decay' must be float"),
        ("lr", "1e39", "'lr' must be <= 1000000"),  # above float32's max: the step overflowed
        ("muon_lr", 1e7, "'muon_lr' must be <= 1000000"),
        ("bias_lr_mult", 1e7, "'bias_lr_mult' must be <= 1000000"),
        ("backbone_lr_mult", 1e39, "'backbone_lr_mult' must be <= 1000000"),
        ("lr_mults", "classifier=1e39", "at most 1e\\+06"),
        ("classes", ",,", "'classes' must be names"),  # it trained on every class
        ("lr_mults", "head=0.1,head=2", "'head' is given twice"),
        ("classes", "[cat, [dog]]", "'classes' must be names"),
        ("classes", ["cat", " "], "'classes' must be names"),
    ],
)
def test_bad_values_are_refused_with_the_rule(key, value, message):
    with pytest.raises(UserError, match=message):
        apply_overrides(TrainConfig(), {key: value}, where="x")


def test_set_options_parse_yaml_scalars_and_check_types():
    overrides = parse_set_options(["lr=1e-3", "ema=true", "model=resnet18", "classes=cat,dog"])
    config = apply_overrides(TrainConfig(), overrides, where="--set")
    assert config.lr == 0.001 and config.ema is True and config.model == "resnet18"
    assert config.classes == ["cat", "dog"]
    assert apply_overrides(config, {"classes": " "}, where="--set").classes == []  # all classes
    with pytest.raises(UserError, match="expected key=value"):
        parse_set_options(["lr"])


def test_every_shipped_recipe_loads_and_names_itself():
    names = list_recipes()
    assert {"seed-cnn", "resnet18"} <= set(names)
    for name in names:
        assert load_recipe(name).recipe == name


def test_seed_cnn_recipe_is_the_lessons_setup():
    c = load_recipe("seed-cnn")
    lesson = ("cnn", 0.1, 0.9, 5e-4, 100, 128, "cosine")
    assert (c.model, c.lr, c.momentum, c.weight_decay, c.epochs, c.batch_size, c.schedule) == lesson
    assert c.lr_mults == ["classifier=0.1"]  # the measured exception: the 4096-wide classifier
    assert (
        c.jitter_brightness == 0.2 and c.jitter_contrast == 0.2 and c.flip and c.crop_padding == 4
    )


def test_unknown_recipe_lists_valid_ones():
    with pytest.raises(UserError, match="valid recipes: .*seed-cnn"):
        load_recipe("seed-cnnn")


def test_recipe_file_with_misspelt_key_fails(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: cnn\nepoch: 3\n")
    with pytest.raises(UserError, match="unknown config key 'epoch'.*did you mean 'epochs'"):
        load_recipe(str(path))
    path.write_text("model: [cnn\n")
    with pytest.raises(UserError, match=r"mine.yaml:2: not valid YAML"):
        load_recipe(str(path))


def test_a_key_written_twice_in_a_yaml_is_refused_with_its_line(tmp_path, capsys):
    from cifarlab.cli import main
    from cifarlab.config import read_yaml_mapping
    from cifarlab.suites import load_suite

    recipe = tmp_path / "mine.yaml"
    recipe.write_text("model: cnn\nlr: 0.1\nepochs: 3\nlr: 0.5\n")
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--data", "x", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{recipe}:4: key 'lr' is set twice; keep one" in err and "not valid YAML" not in err
    assert len(err.splitlines()) == 1 and not out.exists()
    suite = tmp_path / "s.yaml"  # at any depth: here inside a run's `set`
    suite.write_text(
        "runs:\n  - name: a\n    recipe: fast\n    set: {lr: 0.1, width: 1, lr: 0.2}\n"
    )
    with pytest.raises(UserError, match=r"s.yaml:4: key 'lr' is set twice"):
        load_suite(str(suite), {"data": "x"})
    recipe.write_text("common: &c {lr: 0.1}\nmine:\n  <<: *c\n  lr: 0.2\n")  # a merge: fine
    assert read_yaml_mapping(recipe)["mine"] == {"lr": 0.2}


def test_a_yaml_that_is_not_utf8_text_is_one_line_for_recipes_and_suites(tmp_path, capsys):
    from cifarlab.cli import main

    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("lr: 0.1  # d\xe9j\xe0 vu\n".encode("latin-1"))  # a UnicodeDecodeError
    for argv in (
        ["train", "--recipe", str(binary), "--data", "x"],
        ["suite", str(binary), "--data", "x"],
    ):
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert "not UTF-8" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_recipe_or_suite_path_that_is_a_folder_says_so_not_that_it_is_missing(tmp_path, capsys):
    from cifarlab.cli import main

    folder = tmp_path / "mine.yaml"
    folder.mkdir()
    for argv in (
        ["train", "--recipe", str(folder), "--data", "x"],
        ["suite", str(folder), "--data", "x"],
    ):
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert "is a folder" in err and "does not exist" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_shipped_name_given_with_yaml_that_is_no_file_names_the_shipped_one(
    tmp_path, capsys, monkeypatch
):
    from cifarlab.cli import main

    monkeypatch.chdir(tmp_path)
    for argv, name in (
        (["suite", "exercise-2.yaml", "--data", "x"], "exercise-2"),
        (["train", "--recipe", "fast.yaml", "--data", "x"], "fast"),
        (["suite", "exercise-2", "--recipe", "seed-cnn.yml", "--data", "x"], "seed-cnn"),
    ):
        assert main([*argv, "--out", "o"]) == 2
        err = capsys.readouterr().err.strip()
        assert "does not exist" in err and f"give its name: {name}" in err, err
        assert len(err.splitlines()) == 1
    assert main(["suite", "mine.yaml", "--data", "x", "--out", "o"]) == 2  # no shipped suite mine
    assert "give its name" not in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_recipe_file_that_names_another_recipe_is_refused_with_base_as_the_hint(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("recipe: seed-cnn\nepochs: 2\n")  # trained the defaults, logged seed-cnn
    with pytest.raises(UserError, match=r"mine.yaml: 'recipe: seed-cnn' .*'base: seed-cnn'"):
        load_recipe(str(mine))
    child = tmp_path / "child.yaml"
    child.write_text("base: mine.yaml\n")
    with pytest.raises(UserError, match="base .*mine.yaml: .*'recipe: seed-cnn'"):
        load_recipe(str(child))
    mine.write_text("base: seed-cnn\nepochs: 2\n")
    assert load_recipe(str(mine)).recipe == "mine" and load_recipe(str(child)).recipe == "child"
    mine.write_text("recipe: mine\nepochs: 2\n")  # its own name, as older best-recipe files say
    assert load_recipe(str(mine)).recipe == "mine"
    trained = load_recipe("fast")  # a run's config.yaml names every key: it is that run again
    save_config(trained, tmp_path / "config.yaml")
    assert load_recipe(str(tmp_path / "config.yaml")) == trained
    older = tmp_path / "config.yaml"  # one from a version with fewer keys still loads
    older.write_text(
        "".join(line for line in older.read_text().splitlines(True) if "threads" not in line)
    )
    assert load_recipe(str(older)).recipe == "fast"
    mine.write_text("base: seed-cnn\nrecipe: seed-cnn\n")  # base given: no hint to write it
    with pytest.raises(UserError, match=r"this file is the recipe 'mine'\)$"):
        load_recipe(str(mine))


def test_a_recipe_may_start_from_another(tmp_path):
    fast, cpu = load_recipe("fast"), load_recipe("fast-cpu")
    assert cpu.time_budget == 900 and fast.time_budget == 0 and cpu.recipe == "fast-cpu"
    assert {k for k, v in cpu.to_dict().items() if fast.to_dict()[k] != v} == {
        "time_budget",
        "fit_width",
        "recipe",
    }
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: fast\nepochs: 3\n")
    assert load_recipe(str(mine)).optimizer == "muon" and load_recipe(str(mine)).epochs == 3
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: ../mine.yaml\nlr: 0.5\n")
    child = load_recipe(str(tmp_path / "sub" / "child.yaml"))  # relative to the child's folder
    assert (child.epochs, child.lr, child.optimizer) == (3, 0.5, "muon")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"base: {b}\n")
    b.write_text(f"base: {a}\n")
    with pytest.raises(UserError, match="in a circle"):
        load_recipe(str(a))
    cpu_child = tmp_path / "cpu-child.yaml"
    cpu_child.write_text("base: fast-cpu\nepochs: 2\n")  # a length here replaces the budget
    assert load_recipe(str(cpu_child)).time_budget == 0
    cpu_child.write_text("base: nosuch\n")
    with pytest.raises(UserError, match="cpu-child.yaml: base nosuch: unknown recipe"):
        load_recipe(str(cpu_child))
    mine.write_text("base: [fast]\n")
    with pytest.raises(UserError, match="'base' must be a recipe name"):
        load_recipe(str(mine))


def test_a_config_yaml_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(load_recipe("fast"), path)
    before = path.read_text()

    def crash(src, dst):  # the process dies between writing the new file and renaming it
        raise KeyboardInterrupt

    monkeypatch.setattr("cifarlab.rundir.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_config(load_recipe("seed-cnn"), path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
