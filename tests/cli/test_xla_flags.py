"""mlgen's XLA:CPU default flag (``mlgen.cli._cpu_xla_flags``): added on jaxlib 0.10, where it
was measured, never over a user's own setting, never on another jaxlib (XLA aborts on flags
its version does not know). What this does not cover: the speed itself (``mlgen bench``)."""

from mlgen.cli import _CPU_FLAG, _cpu_xla_flags


def test_the_ynn_default_is_added_on_jaxlib_0_10_only():
    assert _cpu_xla_flags("", "0.10.2") == _CPU_FLAG
    assert _cpu_xla_flags("--xla_dump_to=/tmp/d", "0.10.0").split() == [
        "--xla_dump_to=/tmp/d",
        _CPU_FLAG,
    ]
    assert _cpu_xla_flags("", "0.11.0") == ""
    assert _cpu_xla_flags("", "0.1.0") == ""


def test_a_users_own_ynn_setting_wins():
    mine = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert _cpu_xla_flags(mine, "0.10.2") == mine
