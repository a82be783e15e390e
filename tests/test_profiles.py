"""Profiles: system prompts from templates, placeholders, YAML files, policies, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

import gearshift as gs
from gearshift.data.profiles import BUILTIN_PROFILES, apply_policy, load_profile
from gearshift.errors import ConfigError


def test_builtin_profiles_render() -> None:
    assert {"default", "concise", "none"} <= set(BUILTIN_PROFILES)
    concise = load_profile("concise")
    assert concise.system_prompt == "Current date: {date}. Respond naturally and concisely."
    assert concise.render(date="2026-12-03") == \
        "Current date: 2026-12-03. Respond naturally and concisely."
    assert load_profile("default").render(date="2026-12-04", variables={"model_name": "tiny"}) \
        == "You are tiny, a helpful assistant. Today is Friday, 2026-12-04."
    assert load_profile("none").render(date="2026-12-04") == ""


def test_yaml_profile_with_variables_and_literal_braces(tmp_path: Path) -> None:
    path = tmp_path / "tutor.yaml"
    path.write_text("name: tutor\ndescription: a tutor\nsystem_prompt: 'You are a {style} "
                    "tutor ({weekday}). Answer in {{braces}}.'\nvariables: {style: patient}\n")
    profile = load_profile(str(path))
    assert (profile.name, profile.source) == ("tutor", str(path))
    assert profile.placeholders == ["style", "weekday"]
    assert profile.render(date="2026-12-05") == \
        "You are a patient tutor (Saturday). Answer in {braces}."
    assert profile.render(date="2026-12-05", variables={"style": "strict"}).startswith(
        "You are a strict tutor")


def test_unfillable_placeholder_is_a_config_error_naming_it_and_the_profile(
        tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("system_prompt: 'Hello {user}, today is {date}. Tone: {tone}.'\n")
    with pytest.raises(ConfigError) as err:
        gs.load_config({"profile": {"name": str(path), "variables": {"tone": "dry"}}})
    message = str(err.value)
    assert "profile.variables: profile 'p' uses placeholder {user} that nothing fills" in message
    assert "set profile.variables.user" in message
    assert "{tone}" not in message.split("fills;")[0]  # tone is given
    ok = gs.load_config({"profile": {"name": str(path),
                                     "variables": {"tone": "dry", "user": "Ada"}}})
    assert ok.profile.variables == {"tone": "dry", "user": "Ada"}
    with pytest.raises(ConfigError, match="unknown profile 'concize'.*'concise'"):
        gs.load_config({"profile": {"name": "concize"}})


def test_bad_profile_files_and_dates_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("system_promt: hi\n")
    with pytest.raises(ConfigError) as err:
        load_profile(str(bad))
    assert "unknown key 'system_promt' (did you mean 'system_prompt'?)" in str(err.value)
    assert "system_prompt must be a string" in str(err.value)
    odd = tmp_path / "odd.yaml"
    odd.write_text("system_prompt: 'Today is {date:%Y}'\n")
    with pytest.raises(ConfigError, match=r"placeholder \{date:%Y\} is not a plain name"):
        load_profile(str(odd))
    with pytest.raises(ConfigError, match="profile.date: expected a date as YYYY-MM-DD"):
        gs.load_config({"profile": {"date": "03/12/2026"}})
    assert gs.load_config({"profile": {"date": "2026-12-03"}}).profile.date == "2026-12-03"


def test_policies() -> None:
    own = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "hi"},
           {"role": "assistant", "content": "arr"}]
    bare = own[1:]
    assert apply_policy(own, "P", "replace") == [{"role": "system", "content": "P"}, *bare]
    assert apply_policy(own, "P", "keep") == own
    assert apply_policy(bare, "P", "keep") == [{"role": "system", "content": "P"}, *bare]
    assert apply_policy(own, "P", "prepend") == [{"role": "system", "content": "P"}, *own]
    assert apply_policy(own, "", "replace") == own  # profile none: the conversation as it is
    with pytest.raises(ConfigError, match="policy"):
        gs.load_config({"profile": {"policy": "merge"}})


def test_cli_profile_list_and_show(cli, tmp_path: Path) -> None:
    code, out, _ = cli("profile", "list")
    assert code == 0
    assert "concise" in out and "Current date: {date}. Respond naturally and concisely." in out
    code, out, _ = cli("profile", "show", "concise", "--date", "2026-12-03")
    assert code == 0
    assert "system prompt: 'Current date: 2026-12-03. Respond naturally and concisely.'" in out
    code, out, _ = cli("profile", "show", "default", "--date", "2026-12-03", "--var",
                       "model_name=tiny")
    assert "You are tiny, a helpful assistant. Today is Thursday, 2026-12-03." in out
    code, _, err = cli("profile", "show", "concise", "--date", "tomorrow")
    assert code == 2 and "--date expects YYYY-MM-DD" in err and "Traceback" not in err
    code, _, err = cli("profile", "show", "nope")
    assert code == 2 and "unknown profile 'nope'" in err
