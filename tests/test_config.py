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


def test_a_float_written_without_a_dot_is_a_number():
    cfg = load("demo", ["train.learning_rate=1e-5", "train.eps=2E-8"])
    assert cfg.train.learning_rate == 1e-5 and cfg.train.eps == 2e-8
    with pytest.raises(ConfigError, match="train.learning_rate: expected a number, got 'fast'"):
        load("demo", ["train.learning_rate=fast"])


def test_a_variant_outside_the_mixture_is_an_error_with_the_fix():
    cfg = load("demo", ["data.mixture=sharegpt,alpaca"])  # fine for stages 1 and 2
    with pytest.raises(ConfigError, match=r"train.variants: 'koala_all' needs hc3, .* not in data.mixture 'sharegpt,alpaca'; set train.variants"):
        config.check_variants(cfg)  # stage 3 checks before training
