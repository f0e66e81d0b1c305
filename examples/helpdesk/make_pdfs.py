"""Generate the two PDF articles of the Brambleby help centre from the text below.

    .venv/bin/python examples/helpdesk/make_pdfs.py

writes ``docs/service/uptime-sla.pdf`` and ``docs/security/security-and-compliance.pdf``
next to this script. The text lives here (the PDFs are build products, committed so that the
example works without fpdf2); regenerate them after editing it, then run check_dataset.py,
because eval.yaml quotes sentences from these PDFs.

Only ASCII text and the core Helvetica font are used, so the text layer that pypdf extracts
is exactly the text written here (modulo line breaks). The creation date is fixed so that
regenerating without edits gives the same file.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

try:
    from fpdf import FPDF
    from fpdf.enums import XPos, YPos
except ImportError:  # pragma: no cover
    sys.exit("fpdf2 is needed: .venv/bin/pip install fpdf2")

HERE = Path(__file__).resolve().parent
DOCS = HERE / "docs"
FIXED_DATE = datetime(2025, 9, 1, 9, 0, 0, tzinfo=timezone.utc)

# Each document: (relative path, title, blocks). A block is ("h1"|"h2"|"p", text),
# ("ul", [items]) or ("table", [header, row, ...]).

UPTIME_SLA = (
    "service/uptime-sla.pdf",
    "Brambleby Uptime Service Level Agreement",
    [
        ("h1", "Brambleby Uptime Service Level Agreement"),
        ("p", "Version 3.1, effective 1 April 2025. This Service Level Agreement (SLA) is part of "
              "the Brambleby Terms of Service for customers on the Business and Enterprise plans."),
        ("h2", "1. Scope"),
        ("p", "This SLA applies to workspaces on the Business and Enterprise plans. The Free and Team "
              "plans are not covered by an SLA and are not eligible for service credits, although they "
              "run on the same infrastructure."),
        ("p", "The SLA covers the Brambleby web app and the public API. Mobile app sync, webhooks and "
              "invoice email delivery are not covered, because they depend on networks and services "
              "outside our control."),
        ("h2", "2. Uptime commitment"),
        ("p", "The Business plan has a monthly uptime commitment of 99.9%. The Enterprise plan has a "
              "monthly uptime commitment of 99.95%."),
        ("p", "For a 30-day month, 99.9% allows about 43 minutes of downtime and 99.95% allows about "
              "22 minutes of downtime."),
        ("h2", "3. How uptime is measured"),
        ("p", "We check the web app and the API every minute from 5 monitoring locations on three "
              "continents. A minute counts as downtime when more than half of the locations cannot "
              "complete a request successfully."),
        ("p", "Monthly uptime percentage = (total minutes in the month - downtime minutes) / total "
              "minutes in the month x 100. Excluded events (section 6) do not count as downtime."),
        ("h2", "4. Service credits"),
        ("p", "If we miss the uptime commitment in a calendar month, you are eligible for a service "
              "credit, calculated as a percentage of the fees for the affected month:"),
        ("table", [
            ["Plan", "Monthly uptime", "Service credit"],
            ["Business", "below 99.9% and at least 99.0%", "10%"],
            ["Business", "below 99.0% and at least 95.0%", "25%"],
            ["Business", "below 95.0%", "50%"],
            ["Enterprise", "below 99.95% and at least 99.5%", "10%"],
            ["Enterprise", "below 99.5% and at least 99.0%", "25%"],
            ["Enterprise", "below 99.0%", "50%"],
        ]),
        ("p", "Business plan: a monthly uptime below 99.9% but at least 99.0% earns a credit of 10% of "
              "the monthly fee, below 99.0% but at least 95.0% earns 25%, and below 95.0% earns 50%."),
        ("p", "Enterprise plan: a monthly uptime below 99.95% but at least 99.5% earns a credit of 10% "
              "of the monthly fee, below 99.5% but at least 99.0% earns 25%, and below 99.0% earns 50%."),
        ("p", "Service credits for a month never exceed 50% of the fees for that month. For annual "
              "subscriptions, the fee for a month is one twelfth of the annual fee."),
        ("p", "Credits are applied to your next invoice. They are not paid out in cash, cannot be "
              "transferred to another workspace, and expire if the subscription ends."),
        ("h2", "5. How to claim a credit"),
        ("p", "The workspace Owner must request the credit by email to support@brambleby.example within "
              "30 days after the end of the month in which the downtime occurred."),
        ("p", "Include your workspace ID and the dates and times (with time zone) when Brambleby was "
              "unavailable to you. We review every claim against our monitoring data and reply within "
              "10 business days. Credits are not applied automatically."),
        ("h2", "6. Exclusions"),
        ("p", "The following do not count as downtime:"),
        ("ul", [
            "Scheduled maintenance announced on the status page at least 72 hours in advance, up to "
            "4 hours per month, within the maintenance window on Sundays between 02:00 and 06:00 UTC.",
            "Outages of third-party services you connect to Brambleby, such as QuickBooks Online, "
            "Xero, Slack, Stripe or PayPal.",
            "Problems caused by your own network, devices, or use of Brambleby against its documentation.",
            "Features labelled as beta or preview.",
            "Suspension of the workspace for non-payment or for a breach of the Terms of Service.",
            "Events beyond our reasonable control (force majeure).",
        ]),
        ("h2", "7. Repeated failures (Enterprise)"),
        ("p", "If an Enterprise workspace's monthly uptime is below 99.0% in 3 consecutive months, the "
              "customer may terminate the contract with 30 days' written notice and receive a refund "
              "of prepaid fees for the remaining term."),
        ("h2", "8. Sole remedy"),
        ("p", "Service credits, and for Enterprise customers the termination right in section 7, are "
              "the only remedies for a failure to meet the uptime commitment. Current and past "
              "availability is shown at status.brambleby.example."),
    ],
)

SECURITY = (
    "security/security-and-compliance.pdf",
    "Brambleby Security and Compliance Overview",
    [
        ("h1", "Brambleby Security and Compliance Overview"),
        ("p", "This document summarises how Brambleby protects your data. It is written for security "
              "reviewers and procurement teams. Updated September 2025."),
        ("h2", "Certifications and audits"),
        ("p", "Brambleby has a SOC 2 Type II report covering the security, availability and "
              "confidentiality criteria. An independent auditor performs the audit every year, covering "
              "the calendar year from 1 January to 31 December."),
        ("p", "The SOC 2 Type II report is available to Business and Enterprise customers under a "
              "non-disclosure agreement. Request it from the Trust Center at trust.brambleby.example."),
        ("p", "An independent security firm performs a penetration test of the web app, the API and "
              "the mobile apps once a year. Enterprise customers can request the executive summary of "
              "the latest test."),
        ("h2", "Hosting and infrastructure"),
        ("p", "Brambleby runs on Amazon Web Services in two regions: eu-central-1 (Frankfurt) for EU "
              "workspaces and us-west-2 (Oregon) for US workspaces. Each region uses at least three "
              "availability zones, so that the loss of one data centre does not take the service down."),
        ("p", "Customer data stays in the region chosen for the workspace, including backups."),
        ("h2", "Encryption"),
        ("ul", [
            "Data at rest, including databases, receipt files and backups, is encrypted with AES-256.",
            "Data in transit is encrypted with TLS 1.2 or higher. Older protocols are refused.",
            "Passwords are never stored; we store only a salted Argon2id hash.",
            "API keys are stored as hashes and are shown only once, when they are created.",
        ]),
        ("h2", "Backups and disaster recovery"),
        ("p", "Databases are backed up every hour, and backups are kept for 35 days. We test restoring "
              "from backup every quarter. Our recovery point objective (RPO) is 1 hour and our recovery "
              "time objective (RTO) is 4 hours."),
        ("h2", "Access to customer data"),
        ("p", "Access to production systems is limited to a small group of on-call engineers, requires "
              "a hardware security key, and is logged. Access rights are reviewed every month."),
        ("p", "Support staff cannot see the contents of a workspace unless the customer grants temporary "
              "support access from the workspace settings."),
        ("p", "All employees pass a background check before they start, where local law allows it, and "
              "complete security and privacy training when they join and every year after that."),
        ("h2", "Payment card data"),
        ("p", "Card payments, both for your Brambleby subscription and from your clients paying "
              "invoices, are processed by Stripe. Brambleby never stores or sees full card numbers."),
        ("h2", "Security features for your team"),
        ("ul", [
            "Two-factor authentication with authenticator apps, security keys and passkeys (all plans).",
            "Enforced two-factor authentication for all members (Team plan and above).",
            "Single sign-on with SAML 2.0 or OIDC (Business and Enterprise).",
            "SCIM user provisioning (Enterprise).",
            "Audit log (Business and Enterprise).",
        ]),
        ("h2", "Incident response and breach notification"),
        ("p", "An engineer is on call 24 hours a day to respond to security alerts. If we confirm a "
              "personal data breach affecting your data, we notify the workspace Owner and Admins without "
              "undue delay and no later than 48 hours after confirming it."),
        ("p", "The notification describes what happened, which data is affected, and what we are doing, "
              "and we send updates as the investigation progresses."),
        ("h2", "Reporting a vulnerability"),
        ("p", "If you believe you have found a security vulnerability in Brambleby, email "
              "security@brambleby.example. We acknowledge reports within 2 business days and will not "
              "take legal action against researchers who act in good faith, avoid privacy violations and "
              "give us reasonable time to fix the issue before disclosing it."),
    ],
)

DOCUMENTS = [UPTIME_SLA, SECURITY]


class _PDF(FPDF):
    def __init__(self, title: str) -> None:
        super().__init__(format="A4")
        self.doc_title = title
        self.set_margins(20, 20, 20)
        self.set_auto_page_break(True, margin=20)

    def footer(self) -> None:
        self.set_y(-14)
        self.set_font("Helvetica", size=8)
        self.set_text_color(120)
        self.cell(0, 6, f"Brambleby help centre - page {self.page_no()}", align="C")
        self.set_text_color(0)


def render(rel: str, title: str, blocks: list) -> Path:
    pdf = _PDF(title)
    pdf.set_title(title)
    pdf.set_author("Brambleby")
    pdf.set_subject("Brambleby help centre")
    pdf.set_creator("examples/helpdesk/make_pdfs.py")
    pdf.set_creation_date(FIXED_DATE)
    pdf.add_page()
    nl = {"new_x": XPos.LMARGIN, "new_y": YPos.NEXT}
    for kind, content in blocks:
        if kind == "h1":
            pdf.set_font("Helvetica", "B", 18)
            pdf.multi_cell(0, 9, content, **nl)
            pdf.ln(3)
        elif kind == "h2":
            pdf.ln(2)
            pdf.set_font("Helvetica", "B", 13)
            pdf.multi_cell(0, 7, content, **nl)
            pdf.ln(1)
        elif kind == "p":
            pdf.set_font("Helvetica", size=10.5)
            pdf.multi_cell(0, 5.5, content, **nl)
            pdf.ln(2.5)
        elif kind == "ul":
            pdf.set_font("Helvetica", size=10.5)
            for item in content:
                pdf.set_x(pdf.l_margin + 4)
                pdf.multi_cell(0, 5.5, "- " + item, **nl)
                pdf.ln(1)
            pdf.ln(1.5)
        elif kind == "table":
            pdf.set_font("Helvetica", size=10)
            with pdf.table(col_widths=(25, 60, 25), text_align="LEFT", line_height=6) as table:
                for i, row in enumerate(content):
                    cells = table.row()
                    for value in row:
                        if i == 0:
                            pdf.set_font("Helvetica", "B", 10)
                        cells.cell(value)
                    pdf.set_font("Helvetica", size=10)
            pdf.ln(3)
        else:  # pragma: no cover
            raise ValueError(f"unknown block kind {kind!r}")
    out = DOCS / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(out))
    return out


def main() -> None:
    for rel, title, blocks in DOCUMENTS:
        for kind, content in blocks:
            text = " ".join(content) if isinstance(content, list) and kind == "ul" else str(content)
            if not text.isascii():
                raise SystemExit(f"{rel}: non-ASCII text in a {kind} block: {text[:60]!r}")
        path = render(rel, title, blocks)
        print(f"wrote {path.relative_to(HERE)}")


if __name__ == "__main__":
    main()
