"""The protocol report on a tiny run produces every section."""

from __future__ import annotations

import json

from proxyprompt.data.demo import write_family
from proxyprompt.protocol import Protocol, Settings


def test_tiny_protocol_writes_every_section(tmp_path):
    data = write_family(tmp_path, "ultrasound", n_train=4, n_val=0, n_test=2, seed=2)
    s = Settings(
        dataset=data, out=tmp_path / "report", backbone="sam_tiny", preset="tiny", steps=2, train_support=2,
        test_support=2, views=2, draws=2, train_sizes=(2, 4), support_sizes=(1, 2, 4),
    )  # fmt: skip
    p = Protocol(s)
    res = p.run()
    text = p.write().read_text()
    for heading in ("## Table 1", "## Table 2", "## Fig. 7", "## Fig. 4"):
        assert heading in text
    assert len(res["table2"]) == 4 and set(res["fig7"]) == {"2,1", "2,2", "4,1", "4,2", "4,4"}
    assert len(res["fig4"]) == 2 and all(len(d) == 2 for d in res["fig4"])
    assert (s.out / "fig7_support_sizes.png").stat().st_size > 0 and (s.out / "fig4_stability.png").is_file()
    assert json.loads((s.out / "results.json").read_text())["table1"] == res["table1"]
