from vm_agent.main import main

main()
