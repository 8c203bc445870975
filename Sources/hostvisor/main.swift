print("hostvisor")
