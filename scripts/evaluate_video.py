"""The paper's video comparison (Fig. 4) on a clip folder: PPG + SAM 2 against MedSAM2-style, SAM2-SGP-style and
SAM 2 prompted on the target's first frame (point, box, mask), over several support draws; writes report.md,
results.json and fig4_video.png into --out. Without --checkpoint SAM 2 has random weights (sam2's tiny config at
256 px): the harness runs, the Dice means nothing."""

from __future__ import annotations

import argparse
from pathlib import Path

from ppgseg.data.video import load_clips
from ppgseg.evaluation.video_protocol import VideoProtocol, video_model
from ppgseg.training import make_optimizer, train_episodes
from ppgseg.training.video import ClipBank, VideoEpisodeNet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", type=Path, default=Path("data/demo/ultrasound_video"))
    p.add_argument("--out", type=Path, default=Path("reports/video"))
    p.add_argument("--checkpoint", default=None, help="a SAM 2.1 checkpoint")
    p.add_argument("--ppg-checkpoint", default=None, help="video-mode PPG weights (else --steps episodes train here)")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--steps", type=int, default=0, help="video episodes to train when no --ppg-checkpoint")
    p.add_argument("--clip-length", type=int, default=3)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    model = video_model(a.checkpoint, a.ppg_checkpoint, a.preset, a.seed)
    protocol = VideoProtocol(model, a.dataset, draws=a.draws, seed=a.seed)
    trained = f"PPG weights {a.ppg_checkpoint}" if a.ppg_checkpoint else "untrained PPG"
    if a.steps and not a.ppg_checkpoint:
        bank = ClipBank(model, load_clips(a.dataset, "training"), protocol.ids, length=a.clip_length)
        net = VideoEpisodeNet(model, bank)
        train_episodes(model, bank, steps=a.steps, num_support=1, optimizer=make_optimizer(model), seed=a.seed,
                       net=net, progress="video episodes")  # fmt: skip
        trained = f"PPG trained here for {a.steps} video episodes"
    protocol.run()
    weights = a.checkpoint or "random SAM 2 weights (tiny config, 256 px): only the harness is meaningful"
    print(f"wrote {protocol.write(a.out, note=f'SAM 2: {weights}; {trained}; preset {a.preset}.')}")


if __name__ == "__main__":
    from ppgseg.runtime import pad_heap

    pad_heap()  # freed heap memory kept: CPU forwards stop paying page faults
    main()
