from valley_rt.cli import app

app(prog_name="valley-rt")
