"""Block-removed students: shown by train/show_student.py; this older path only says so (exit 2)."""

from sdkd.cli.errors import moved

if __name__ == "__main__":
    moved("python train/show_student.py")
