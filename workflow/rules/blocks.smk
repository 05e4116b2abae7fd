# Block-overlap index (PFAN's position input) and GLFN's tag vectors' companions.
