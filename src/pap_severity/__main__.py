from pap_severity.cli import app

app(prog_name="pap-severity")
