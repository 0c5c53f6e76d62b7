print("BankSample: not written yet")
