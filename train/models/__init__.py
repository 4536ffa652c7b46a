"""The networks and where they come from: model families and their conditioning (families.py), loading a pipeline's
parts (teacher.py), block-removed students, their removal specs and weight maps (students.py; the `student` config
section, student_config.py) with their feature-KD pairs and hooks (features.py), and the toy world's teacher (toy.py,
sd_configs.py, and the trained toy_teacher/ folder)."""
