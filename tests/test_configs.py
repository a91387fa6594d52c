"""Every shipped config under ``configs/`` loads and passes every check a run makes before it
compiles (sections, the task's cross-section checks, the mesh on 8 devices). Cheap: nothing is
built or trained. That the configs also train is covered for the small ones elsewhere (the
README's tiny LM, ``test_digits_configs_smoke``, the demo runs measured by hand)."""

from pathlib import Path

import pytest

import mlgen
from mlgen.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.py"))
# A config that needs another run's workdir says so in one line naming the field.
NEEDS = {"configs/diffusion/digits_latent.py": "data.vae"}


def test_every_config_is_found():
    assert len(CONFIGS) >= 15 and "configs/diffusion/digits_text.py" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_and_validates(path, tmp_path):
    def load():
        return mlgen.config.load(str(REPO / path), [f"workdir={tmp_path}"]).validate(8)

    if path in NEEDS:
        with pytest.raises(ConfigError) as e:
            load()
        assert str(e.value).startswith(NEEDS[path] + ":") and "\n" not in str(e.value)
    else:
        load()
