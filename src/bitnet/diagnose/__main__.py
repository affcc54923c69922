"""python -m bitnet.diagnose --checkpoint OUT_DIR [--write]"""
from .report import main

main()
