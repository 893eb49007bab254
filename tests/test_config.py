from pathlib import Path

import pytest

from koala_lib import config
from koala_lib.config import ConfigError, load


@pytest.mark.parametrize("profile", ["smoke", "demo", "koala13b", "koala13b_distill", "koala13b_blog_markers"])
def test_every_profile_loads_and_validates(profile):
    cfg = load(profile)
    assert cfg.profile == profile
    assert cfg.data.source_names()


def test_profiles_hold_the_koala_mixtures():
    assert load("koala13b").data.source_names() == config.SOURCE_NAMES
    assert load("koala13b_distill").data.source_names() == ("sharegpt", "hc3")
    assert load("koala13b").data.sources.hh.origin == "hub"
    assert load("koala13b").model.preset == "llama-13b"
    assert load("demo").data.sources.sharegpt.origin == "demo"
    blog = load("koala13b_blog_markers").conditioning
    assert (blog.marker("positive"), blog.marker("negative"), blog.marker("none")) == ("A helpful answer:", "An unhelpful answer:", "A helpful answer:")
    released = load("koala13b").conditioning
    assert (released.marker("positive"), released.marker("negative")) == ("GPT:", "An Unhelpful Answer:")


def test_overrides_are_typed_and_nested():
    cfg = load("demo", ["seed=7", "data.sources.hc3.answers=human", "data.sources.sharegpt.keywords=a,b", "data.cap_per_source=5"])
    assert cfg.seed == 7
    assert cfg.data.sources.hc3.answers == "human"
    assert cfg.data.sources.sharegpt.keywords == ("a", "b")
    assert cfg.data.cap_per_source == 5
    assert load("demo", {"data.mixture": "sharegpt,alpaca"}).data.source_names() == ("sharegpt", "alpaca")


def test_config_is_frozen():
    cfg = load("demo")
    with pytest.raises(Exception):
        cfg.seed = 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.sorces.hh.path=x", "unknown key 'data.sorces'; did you mean 'sources'?"),
        ("data.sources.hh.pth=x", "unknown key 'data.sources.hh.pth'; did you mean 'path'?"),
        ("data.sources.hc3.answers=gpt", "data.sources.hc3.answers: 'gpt' is not allowed (allowed: both, human)"),
        ("seed=abc", "seed: expected an integer, got 'abc'"),
        ("data.mixture=koala_everything", "unknown source or preset 'koala_everything'"),
        ("model.preset=llama-65b", "model.preset: 'llama-65b' is not allowed"),
        ("noequals", "expected key=value"),
        ("train.mesh=1,2", "train.mesh: mesh '1,2': expected three sizes 'data,fsdp,tensor'"),
        ("train.mesh=1,-1,-1", "train.mesh: mesh '1,-1,-1': expected three sizes"),
        ("train.mesh=a,b,c", "train.mesh: mesh 'a,b,c': expected three integers"),
        ("train.variants=[koala-all]", "train.variants: unknown source or preset 'koala-all'"),
        ("generate.temperature=5", "generate.temperature: 5.0; allowed 0 to 2"),
        ("generate.top_p=1.5", "generate.top_p: 1.5; allowed 0 to 1"),
        ("generate.top_k=-1", "generate.top_k -1"),
        ("generate.min_new_tokens=300", "generate.max_new_tokens: 48; it must be at least 1 and at least generate.min_new_tokens (300)"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load("demo", [override])
    assert message in str(err.value)


def test_unknown_key_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"allowed: mixture, pairs, cap_per_source"):
        load("demo", ["data.foo=1"])


def test_override_given_twice_is_an_error():
    with pytest.raises(ConfigError, match="given twice"):
        load("demo", ["seed=1", "seed=2"])


def test_yaml_key_given_twice_is_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("seed: 1\ndata:\n  mixture: koala_all\n  mixture: koala_distill\n")
    with pytest.raises(ConfigError, match=r"'mixture' is given twice \(line 4\)"):
        load(str(path))


def test_missing_profile_lists_available():
    with pytest.raises(ConfigError, match=r"available: .*demo.*smoke"):
        load("nope")


def test_show_prints_every_key_with_its_comment():
    text = config.show(load("koala13b"))
    assert "  mixture: koala_all  # a preset" in text
    assert "      origin: hub  # where rows come from" in text
    assert "  base: huggyllama/llama-13b  # base checkpoint" in text
    # every value line carries a comment
    assert all("  # " in line for line in text.splitlines())


def test_relative_runs_dir_is_taken_from_the_kit_root(tmp_path):
    assert load("smoke").run_dir == config.project_root() / "runs" / "smoke"
    assert load("smoke", [f"runs_dir={tmp_path}"]).run_dir == tmp_path / "smoke"
    assert load("demo").figures_path == config.project_root() / "figures"


def test_runs_dir_option_is_taken_from_the_current_folder_and_keeps_the_figures(tmp_path, monkeypatch):
    """`--runs-dir DIR` (config.with_runs_dir) is relative to where the user stands, and the demo profile's figures
    (`figures_dir: figures`, the kit's tracked folder) go inside it; a figures_dir the user names still wins."""
    monkeypatch.chdir(tmp_path)
    cfg = load("demo", config.with_runs_dir([], "myruns"))
    assert cfg.run_dir == tmp_path / "myruns" / "demo"
    assert cfg.figures_path == tmp_path / "myruns" / "demo" / "figures"
    cfg = load("demo", config.with_runs_dir(["figures_dir=/tmp/mine"], "myruns"))
    assert cfg.figures_path == Path("/tmp/mine") and cfg.run_dir == tmp_path / "myruns" / "demo"
    assert config.with_runs_dir(["seed=1"], None) == ["seed=1"]


def test_a_float_written_without_a_dot_is_a_number():
    cfg = load("demo", ["train.learning_rate=1e-5", "train.eps=2E-8"])
    assert cfg.train.learning_rate == 1e-5 and cfg.train.eps == 2e-8
    with pytest.raises(ConfigError, match="train.learning_rate: expected a number, got 'fast'"):
        load("demo", ["train.learning_rate=fast"])


def test_a_variant_outside_the_mixture_is_an_error_with_the_fix():
    cfg = load("demo", ["data.mixture=sharegpt,alpaca"])  # fine for stages 1 and 2
    with pytest.raises(ConfigError, match=r"train.variants: 'koala_all' needs hc3, .* not in data.mixture 'sharegpt,alpaca'; set train.variants"):
        config.check_variants(cfg)  # stage 3 checks before training
    with pytest.raises(ConfigError, match=r"^--variant: unknown source or preset 'koala-all'"):
        config.check_variants(load("demo"), ["koala-all"], "--variant")


def test_the_config_reference_page_is_every_key_at_its_default():
    """docs/config.md carries `koala config show --defaults` exactly: a key added or a comment changed shows there."""
    page = (config.project_root() / "docs" / "config.md").read_text(encoding="utf-8")
    block = page.split("```yaml\n", 1)[1].rsplit("```", 1)[0]
    assert block == config.show(config.defaults())
