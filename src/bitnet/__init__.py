"""bitnet-tiny: does a BitNet b1.58 training stack work? See README.md."""
