"""Operations: Ray Jobs submission, schedules and their supervisor, the local Ray a run starts,
and the storage doctor."""
