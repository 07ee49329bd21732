"""Generated data in the data contract, drawn from a seed, nothing downloaded: `families` (fundus-, ultrasound- and
CT-like subjects, the demo), `shapes` (two-object images for unit tests) and `tasks` (domain-randomised tasks)."""
