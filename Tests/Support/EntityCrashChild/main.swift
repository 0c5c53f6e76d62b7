print("EntityCrashChild: not written yet")
