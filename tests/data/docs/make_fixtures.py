"""Regenerate the binary fixtures of the parsing tests.

    .venv/bin/python tests/data/docs/make_fixtures.py

Needs the ``dev`` extras (``fpdf2`` for PDFs, ``python-docx`` for DOCX). The generated files
are committed, so the tests themselves never need these packages. ``guide.md``,
``handbook.html`` and ``notes.txt`` are written by hand and are not touched here.

Files written:

* ``report.pdf``       two pages, title metadata, headings and paragraphs
* ``owner_locked.pdf`` encrypted with an owner password only (opens without a password)
* ``encrypted.pdf``    needs a user password -> ``encrypted_file``
* ``image_only.pdf``   a page with a drawing and no text -> ``no_extractable_text``
* ``corrupt.pdf``      a PDF header followed by garbage -> ``corrupt_file``
* ``policy.docx``      title, headings, paragraphs, bullet/numbered/nested lists, a table,
                       a code-styled block and a line break
* ``corrupt.docx``     not a zip archive -> ``corrupt_file``
* ``latin1.txt``       Latin-1 bytes (not UTF-8) -> ``bad_encoding``
* ``utf16.txt``        UTF-16 with a byte-order mark (decodes fine)
* ``bom.md``           UTF-8 with a byte-order mark and CRLF line endings (decodes fine)
* ``empty.txt``        no bytes -> ``empty_file``
* ``blank.md``         only whitespace -> ``empty_file``
* ``program.exe``      a PE header -> ``unsupported_type``
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXED_DATE = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def _pdf():
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_auto_page_break(auto=True, margin=20)
    pdf.set_margins(20, 20, 20)
    return pdf


def _pdf_heading(pdf, text: str, size: int = 16) -> None:
    pdf.set_font("Helvetica", style="B", size=size)
    pdf.multi_cell(0, 9, text, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)


def _pdf_paragraph(pdf, text: str) -> None:
    pdf.set_font("Helvetica", size=11)
    pdf.multi_cell(0, 6, text, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(6)


REPORT_PAGES = [
    [
        ("title", "Quarterly Reliability Report"),
        ("p", "This report summarises how the gateway behaved in the first quarter. It covers availability, "
              "latency and the incidents that affected customers."),
        ("h", "Availability"),
        ("p", "The gateway answered 99.97 percent of requests successfully. Most failures came from one "
              "upstream vendor during a regional outage in February."),
        ("p", "Retries recovered two thirds of the failed requests without the caller noticing."),
    ],
    [
        ("h", "Latency"),
        ("p", "The median time to first token was 310 milliseconds. The slowest percentile was dominated "
              "by long prompts sent to the largest models."),
        ("h", "Next steps"),
        ("p", "We will add a second vendor for the embedding models and lower the default timeout."),
    ],
]


def make_pdfs() -> None:
    from fpdf.enums import EncryptionMethod

    pdf = _pdf()
    pdf.set_title("Quarterly Reliability Report")
    pdf.set_author("Loadbear")
    for page in REPORT_PAGES:
        pdf.add_page()
        for kind, text in page:
            if kind == "p":
                _pdf_paragraph(pdf, text)
            else:
                _pdf_heading(pdf, text, size=20 if kind == "title" else 14)
    pdf.output(str(HERE / "report.pdf"))

    pdf = _pdf()
    pdf.set_title("Locked for editing")
    pdf.set_encryption(owner_password="owner-secret", encryption_method=EncryptionMethod.RC4)
    pdf.add_page()
    _pdf_heading(pdf, "Editing restricted")
    _pdf_paragraph(pdf, "Anyone can read this document, but only its owner may change it.")
    pdf.output(str(HERE / "owner_locked.pdf"))

    pdf = _pdf()
    pdf.set_encryption(
        owner_password="owner-secret", user_password="user-secret", encryption_method=EncryptionMethod.RC4
    )
    pdf.add_page()
    _pdf_paragraph(pdf, "Nobody should be able to read this without the password.")
    pdf.output(str(HERE / "encrypted.pdf"))

    pdf = _pdf()
    pdf.add_page()
    pdf.set_fill_color(40, 90, 160)
    pdf.rect(30, 40, 120, 80, style="F")
    pdf.ellipse(60, 150, 60, 40, style="D")
    pdf.output(str(HERE / "image_only.pdf"))

    (HERE / "corrupt.pdf").write_bytes(
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R\n"
        b"\x00\x13\x37 this is not a PDF body, the file was cut short by a failed upload"
    )


def make_docx() -> None:
    import docx
    from docx.enum.style import WD_STYLE_TYPE
    from docx.shared import Pt

    doc = docx.Document()
    doc.core_properties.title = "Travel Expense Policy"
    doc.core_properties.author = "Finance"
    doc.core_properties.created = FIXED_DATE.replace(tzinfo=None)
    doc.core_properties.modified = FIXED_DATE.replace(tzinfo=None)
    code = doc.styles.add_style("Code", WD_STYLE_TYPE.PARAGRAPH)
    code.font.name = "Courier New"
    code.font.size = Pt(9)

    doc.add_heading("Travel Expense Policy", level=0)  # the Title style
    doc.add_paragraph(
        "This policy explains which travel costs the company pays for and how to claim them. "
        "It applies to every employee and contractor."
    )
    doc.add_heading("Booking travel", level=1)
    doc.add_paragraph("Book trains and flights through the travel portal at least two weeks ahead.")
    doc.add_paragraph("Economy class for flights under six hours.", style="List Bullet")
    doc.add_paragraph("Business class for longer flights.", style="List Bullet")
    doc.add_paragraph("Only with a manager's approval.", style="List Bullet 2")
    doc.add_paragraph("Second-class rail tickets.", style="List Bullet")
    doc.add_heading("Hotels", level=2)
    p = doc.add_paragraph("Hotels must be within the city's nightly limit.")
    p.add_run().add_break()
    p.add_run("The limits are listed below.")
    table = doc.add_table(rows=3, cols=2)
    for row, (city, limit) in zip(table.rows, [("City", "Nightly limit"), ("London", "GBP 180"), ("Berlin", "EUR 140")]):
        row.cells[0].text = city
        row.cells[1].text = limit
    doc.add_heading("Claiming expenses", level=1)
    doc.add_paragraph("Submit the claim within thirty days.", style="List Number")
    doc.add_paragraph("Attach every receipt as a PDF or a photo.", style="List Number")
    doc.add_paragraph("Wait for your manager to approve it.", style="List Number")
    doc.add_paragraph("Claims can also be filed from the command line:")
    doc.add_paragraph("expenses submit --trip 2024-05-berlin \\", style="Code")
    doc.add_paragraph("    --receipts ./receipts/*.pdf", style="Code")
    doc.add_paragraph("Payments are made with the next salary.")
    doc.save(str(HERE / "policy.docx"))

    (HERE / "corrupt.docx").write_bytes(b"PK\x03\x04\x14\x00\x00\x00 truncated: this is not a complete zip archive")


def make_text_files() -> None:
    (HERE / "latin1.txt").write_bytes(
        "Caf\u00e9 opening hours\n\nThe caf\u00e9 opens at 8:00 and closes at 18:00.\n".encode("latin-1")
    )
    (HERE / "utf16.txt").write_bytes(
        "Gr\u00fc\u00dfe aus K\u00f6ln\n\nDieser Text ist UTF-16 mit BOM kodiert.\n".encode("utf-16")
    )
    (HERE / "bom.md").write_bytes(
        b"\xef\xbb\xbf# Notes\r\n\r\nFirst paragraph\r\nwith two lines.\r\n\r\n## Next\r\n\r\n- a\r\n- b\r\n"
    )
    (HERE / "empty.txt").write_bytes(b"")
    (HERE / "blank.md").write_bytes(b"  \n\n\t\n   \n")
    (HERE / "program.exe").write_bytes(
        b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + b"\x00" * 48 + b"This program cannot be run in DOS mode.\r\n"
    )


def main() -> None:
    make_pdfs()
    make_docx()
    make_text_files()
    for path in sorted(HERE.iterdir()):
        if path.suffix != ".py":
            print(f"{path.name:20} {path.stat().st_size:7d} bytes")


if __name__ == "__main__":
    main()
