"""The export's model card (training/model_card.py): front matter the Hub reads, numbers from the provenance, the
base model's license when its own card states one, and "unknown" rather than a guess."""

from __future__ import annotations

from pathlib import Path

from training.model_card import card_license, model_card

PROVENANCE = {"objective": "cpt", "base_model": "/models/SmolLM2-135M", "steps": 120, "tokens": 983_040,
              "weights": "the best checkpoint, step-0000000100", "stopped": None, "config_sha256": "ab" * 32,
              "data_manifests": ["11" * 32, "22" * 32],
              "validation": {"domain_loss": 2.3456, "domain_ppl": 10.44, "general_loss": 3.0, "general_ppl": 20.09}}


def test_the_card_holds_the_provenance_and_the_base_models_license(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlibrary_name: transformers\nlicense: apache-2.0  # of the weights\n"
                                    "language:\n- en\n---\n# SmolLM2\n")
    card = model_card(PROVENANCE, [base])
    front = card.split("---\n")[1]
    assert "license: apache-2.0\n" in front and 'base_model: "/models/SmolLM2-135M"' in front and "- cpt" in front
    for shown in ("| optimizer steps | 120 |", "| training tokens | 983,040 |", "step-0000000100",
                  "| domain validation | 2.3456 | 10.44 |", "| general validation | 3.0000 | 20.09 |",
                  "- `" + "11" * 32 + "`", "`apache-2.0`, as stated by the base model's card"):
        assert shown in card, shown


def test_without_a_license_or_numbers_the_card_says_so(tmp_path: Path) -> None:
    assert card_license(tmp_path) is None  # no README.md
    (tmp_path / "README.md").write_text("# a card without front matter\nlicense: mit\n")
    assert card_license(tmp_path) is None, "only the front matter states a license"
    card = model_card({"steps": 1}, [tmp_path, ""])
    assert "license: other\n" in card and "states no license" in card
    assert "| training tokens | unknown |" in card and "No evaluation was recorded." in card
    assert card_license(tmp_path / "missing") is None


def test_the_teachers_license_serves_when_the_student_folder_has_none(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "README.md").write_text("---\nlicense: 'llama3.1'\n---\n")
    card = model_card({"objective": "distill", "teacher": str(teacher), "base_model": str(tmp_path / "student")},
                      [tmp_path / "student", teacher])
    assert "license: llama3.1\n" in card and f"teacher {teacher}" in card and "- distill" in card
