"""Documents for continued pretraining: text out of .txt, .md, .pdf, .docx and .pptx files
(made here with the same libraries people write them with), tokenized with EOS after each
document, documents kept apart, long ones split in order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data.documents import document_text
from data.errors import KeelError
from data.formats import load_format
from data.prepare import PrepOptions, prepare_file

FMT = load_format("hermes-qwen3")
TEXTS = {
    "a.txt": "Plain text notes about the weather in Paris.\nSecond line.",
    "b.md": "# Title\n\nSome *markdown* with a list:\n\n- one\n- two",
    "c.pdf": "A PDF page about currency conversion.",
    "d.docx": "A Word document about stock prices.",
    "e.pptx": "A slide about local time in Tokyo.",
}


def make_documents(d: Path) -> Path:
    from docx import Document
    from fpdf import FPDF
    from pptx import Presentation
    from pptx.util import Inches

    d.mkdir(parents=True, exist_ok=True)
    (d / "a.txt").write_text(TEXTS["a.txt"], encoding="utf-8")
    (d / "b.md").write_text(TEXTS["b.md"], encoding="utf-8")
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.cell(text=TEXTS["c.pdf"])
    pdf.output(str(d / "c.pdf"))
    doc = Document()
    doc.add_paragraph(TEXTS["d.docx"])
    doc.save(str(d / "d.docx"))
    deck = Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[6])
    slide.shapes.add_textbox(Inches(1), Inches(1), Inches(6), Inches(1)).text_frame.text = TEXTS["e.pptx"]
    deck.save(str(d / "e.pptx"))
    (d / "ignored.bin").write_bytes(b"\x00\x01")  # not a document type: not read
    return d


def test_text_comes_out_of_every_document_type(tmp_path):
    d = make_documents(tmp_path / "docs")
    for name, text in TEXTS.items():
        assert document_text(name, (d / name).read_bytes()).strip() == text


def test_a_directory_of_documents_prepares_one_example_per_document_ending_in_eos(tiny_model, tmp_path):
    d = make_documents(tmp_path / "docs")
    prepared = prepare_file(d, tokenizer_dir=tiny_model, fmt=FMT, seq_len=512, cache_root=tmp_path / "c")
    assert prepared.kind == "document" and prepared.stats.rows == 5 and prepared.stats.examples == 5
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = prepared.load()
    for (name, text), ids, labels in zip(sorted(TEXTS.items()), ds["input_ids"], ds["labels"]):
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1  # one boundary, at the end
        assert labels == ids  # every token trained
        assert tok.decode(ids[:-1]).strip() == text, name


def test_a_long_document_is_split_in_order_without_losing_tokens(tiny_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    long_text = " ".join(f"sentence {i} about the weather." for i in range(200))
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "short one"}) + "\n")
    prepared = prepare_file(data, tokenizer_dir=tiny_model, fmt=FMT, seq_len=128, cache_root=tmp_path / "c")
    ds = prepared.load()
    full = tok(long_text)["input_ids"] + [tok.eos_token_id]
    n = -(-len(full) // 128)
    assert prepared.stats.documents_split == 1 and prepared.stats.examples == n + 1
    assert sum(ds["input_ids"][:n], []) == full  # the chunks, in order, are the document
    assert all(len(x) <= 128 for x in ds["input_ids"])
    assert ds["input_ids"][n] == tok("short one")["input_ids"] + [tok.eos_token_id]  # not glued to the long one


def test_unreadable_or_empty_documents_are_rejected_with_the_reason(tiny_model, tmp_path):
    from fpdf import FPDF

    d = make_documents(tmp_path / "docs")
    pdf = FPDF()
    pdf.add_page()  # a page with no text layer, like a scan
    pdf.output(str(d / "scan.pdf"))
    (d / "broken.docx").write_bytes(b"not a zip")
    (d / "control.txt").write_text("text with <|im_end|> inside")
    with pytest.raises(KeelError, match="3 of 8 rows are invalid") as err:
        prepare_file(d, tokenizer_dir=tiny_model, fmt=FMT, seq_len=512, cache_root=tmp_path / "c")
    msg = str(err.value)
    assert f"{d}/scan.pdf: no text in this document (a scanned PDF needs OCR first)" in msg
    assert f"{d}/broken.docx: not a readable .docx file" in msg
    assert f"{d}/control.txt: text: contains the literal control token '<|im_end|>'" in msg
    skipped = prepare_file(d, tokenizer_dir=tiny_model, fmt=FMT, seq_len=512, cache_root=tmp_path / "c",
                           options=PrepOptions(on_invalid="skip"))
    assert skipped.stats.examples == 5 and skipped.stats.rejected == 3


def test_documents_cannot_be_read_as_conversations(tiny_model, tmp_path):
    d = make_documents(tmp_path / "docs")
    with pytest.raises(KeelError, match="documents are read as data.shape 'text', not 'messages'"):
        prepare_file(d / "a.txt", tokenizer_dir=tiny_model, fmt=FMT, seq_len=512, cache_root=tmp_path / "c",
                     options=PrepOptions(shape="messages"))
