"""Plain text out of document files, for continued pretraining (CPT).

One file is one document. Text files are read as UTF-8; PDF, Word and PowerPoint files go
through the field's libraries (pypdf, python-docx, python-pptx), which extract text only:
no OCR, so a scanned PDF without a text layer comes out empty and is reported as such.
"""

from __future__ import annotations

import io
import zipfile

from data.conversation import RowError

TEXT_SUFFIXES = (".txt", ".md")
DOCUMENT_SUFFIXES = TEXT_SUFFIXES + (".pdf", ".docx", ".pptx")


def _pdf_text(data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except PdfReadError as exc:
        raise RowError(f"not a readable PDF ({exc})") from None
    return "\n\n".join(p.strip("\n") for p in pages if p.strip())


def _docx_text(data: bytes) -> str:
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise RowError(f"not a readable .docx file ({exc})") from None
    blocks = [p.text for p in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            blocks.append("\t".join(cell.text for cell in row.cells))
    return "\n".join(blocks).strip("\n")


def _pptx_text(data: bytes) -> str:
    from pptx import Presentation
    from pptx.exc import PackageNotFoundError

    try:
        deck = Presentation(io.BytesIO(data))
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise RowError(f"not a readable .pptx file ({exc})") from None
    slides = []
    for slide in deck.slides:
        frames = [shape.text_frame.text for shape in slide.shapes if shape.has_text_frame]
        text = "\n".join(t for t in frames if t.strip())
        if text:
            slides.append(text)
    return "\n\n".join(slides)


def document_text(name: str, data: bytes) -> str:
    """The text of one document file, by its suffix. Raises RowError when there is none."""
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if suffix in TEXT_SUFFIXES:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowError(f"not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None
    elif suffix == ".pdf":
        text = _pdf_text(data)
    elif suffix == ".docx":
        text = _docx_text(data)
    elif suffix == ".pptx":
        text = _pptx_text(data)
    else:
        raise RowError(f"not a document type Keel reads ({', '.join(DOCUMENT_SUFFIXES)})")
    if not text.strip():
        hint = " (a scanned PDF needs OCR first)" if suffix == ".pdf" else ""
        raise RowError(f"no text in this document{hint}")
    return text
